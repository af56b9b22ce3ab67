"""The names hpo stores on Optuna studies and trials (user attrs), defined once.

The report, the dashboard and anyone reading the storage with Optuna see these keys; a trial's
measurements (``train_seconds``, ``eval_accuracy``, …) are stored under their own names beside them.
"""

# Trial user attrs
FAIL_REASON = "fail_reason"  # "Type: message" of a FAIL; "interrupted" only after a signal
FAIL_TRACEBACK = "fail_traceback"  # the last 4,000 characters of the traceback, secrets masked
PRUNED_AT_STEP = "pruned_at_step"  # examples seen when the pruner stopped the trial
DERIVED_PARAMS = "derived_params"  # the values of derive: entries, computed from the sampled ones
REVISION = "revision"  # the revision of the study file the trial ran under (see hpo.study.revisions)
SAVE_ERROR = "save_error"  # why a winning trial's model was not saved (its value is kept)
CHECKPOINT_ERROR = "checkpoint_error"  # why a checkpoint was not written (the trial trained on; resumes from less)
REJECTED_BY_CONSTRAINT = "rejected_by_constraint"  # the constraints: entry the sampled values broke
REJECTED_DUPLICATE = "rejected_duplicate"  # the finished trial whose parameters it repeated
REJECTED_ENQUEUED = "rejected_enqueued"  # queued parameters outside the search space
REJECTIONS = (REJECTED_BY_CONSTRAINT, REJECTED_DUPLICATE, REJECTED_ENQUEUED)  # a FAIL before training
RETRY_OF = "retry_of"  # the interrupted trial whose parameters a queued trial reruns
WORKER = "worker"  # host, pid, CUDA_VISIBLE_DEVICES and cluster job (hpo submit) of the process that ran it
DEVICES = "devices"  # the devices lr_scaling counted, so that an export scales the rate as the trial did
MICRO_BATCH = "micro_batch"  # the per-device batch the trial trained with (below the sampled one after running out)
OOM_AT = "oom_micro_batches"  # the micro-batches that ran out of memory, largest first
EVAL_BATCH = "eval_batch"  # the eval batch it evaluated with, after an evaluation ran out of memory above it
MEMORY = "memory_signature"  # device model and size, max_memory_gb, revision: whose OOM_AT tells about whose
OOM_RETRIES = "oom_retries"  # how many times the trial started again at a smaller micro-batch or eval batch
OUT_OF_MEMORY = "out_of_memory"  # a FAIL for memory: a trait of the configuration, not of the worker
TEST_METRICS = "test_metrics"  # data.test: {test_loss, ...} of a trial that may be among the best; never chosen on
FINALIST = "finalist"  # finalists: {scores: {metric: value}, rows, samples} of a trial that may be among the top N
GENERATE_SECONDS = "generate_seconds"  # the finalist's generation and scoring, apart from its training time
TEST_TOP_K = 3  # data.test evaluates the trials that may end among the study's best 3, and the report shows those

# Study user attrs
CONFIG = "config"  # the resolved study file of the latest revision
FINGERPRINT = "fingerprint"  # what makes the trials comparable, as of the latest revision
CLUSTER_JOBS = "cluster_jobs"  # [{"engine", "id", "workers", "time"}]: what hpo submit submitted, oldest first
REVISIONS = "revisions"  # [{"revision", "time", "changes", "fingerprint"}], oldest first
