"""hpo's Trainer: one module-level ``transformers.Trainer`` subclass; each trial's knobs are given to ``__init__``.

It builds the param groups (weight decay × new head/pretrained body), the optimizer by name, and the step and
plateau schedules (:mod:`hpo.knobs`); evaluates on the study's eval subsample before the last step; saves
checkpoints without credentials; and evaluates every eval row on every rank of a multi-process trial.
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import torch
import transformers
from transformers.optimization import Adafactor

from hpo.config.compose import CREDENTIALS
from hpo.knobs import Knobs, is_head
from hpo.trial.checkpoints import CheckpointCallback
from hpo.trial.lanes import LaneView
from hpo.trial.model import flattening, rows_kept_apart

#: The optimizers ``optimizer:`` names.
OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adafactor": Adafactor,
}


def fastest_kernel(cls: type, params: list) -> dict[str, bool]:
    """``fused=True`` where torch has a fused kernel for ``cls`` on the parameters' device, else ``foreach=True``
    where it has that; ``{}`` otherwise.

    torch picks neither for CPU tensors by default: a fused AdamW step on 29M parameters took 0.067 s against
    0.407 s for the default one on a 2-core CPU (TrainingArguments' own default optim is already the fused one).
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices  # private: read where it is used

    accepted = inspect.signature(cls).parameters
    devices = {p.device.type for p in params}
    floating = all(p.is_floating_point() for p in params)
    if "fused" in accepted and floating and devices <= set(_get_fused_kernels_supported_devices()):
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted and floating else {}


class KnobsTrainer(transformers.Trainer):
    """Param groups (decay × head/body), the optimizer by name, and the step and plateau schedules.

    One class for every trial: a trial's own settings are ``__init__``'s ``knobs`` (hpo's knobs), ``heads`` (the
    modules the checkpoint lacked) and ``eval_subset`` (:func:`hpo.trial.workbench.eval_subsample`)."""

    def __init__(self, *args, knobs: Knobs, heads: list[str], eval_subset: list[int] | None = None, **kwargs):
        lane = kwargs.get("model")
        if isinstance(lane, LaneView):  # a packed trial (hpo.trial.pack): built over the pack's model, then its lane
            kwargs["model"] = lane.pack.model
        super().__init__(*args, **kwargs)
        self.knobs, self.heads, self.eval_subset = knobs, heads, eval_subset
        if isinstance(lane, LaneView):
            lane.attach(self)

    def get_train_dataloader(self):
        if not self.knobs.packing:
            return super().get_train_dataloader()
        # packing: flattened training batches; evaluations stay padded (their values compare with unpacked trials')
        if not rows_kept_apart(self.model, self.train_dataset):  # (validation refuses deepspeed and fsdp with it)
            raise ValueError(
                f"packing: {type(self.model).__name__} attends across flattened rows (its attention does not read them "
                "from the position ids): packing false"
            )
        padded, self.data_collator = self.data_collator, flattening()  # the loader keeps the collator it is given
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = padded

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        # Before the last optimizer step (a pruning point), the study's fixed subsample of the eval rows.
        if eval_dataset is None and self.eval_subset is not None and self.state.global_step < self.state.max_steps:
            eval_dataset = [self.eval_dataset[i] for i in self.eval_subset]
        # Looking leaves the training as it was: each eval DataLoader draws its base seed from torch's global
        # generator, which then gives the training's dropout masks and the next epoch's shuffle. Without this,
        # one configuration ended at eval loss 1.383 evaluated 4 times and 1.365 evaluated once (MiniLM, same
        # seed): its value depended on how often the study looked at it.
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            return super().evaluate(eval_dataset, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # A checkpoint that cannot be written (a full disk) is a warning, not a failed trial: hpo.trial.checkpoints
        save = super()._save_checkpoint
        saver = next((c for c in self.callback_handler.callbacks if isinstance(c, CheckpointCallback)), None)
        if saver is None:
            return save(model, trial)
        where = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        saver.write(lambda: save(model, trial), where, self.state.global_step)

    def get_decay_parameter_names(self, model) -> list[str]:
        if isinstance(model, LaneView):  # the lane's parameters, by the layers they are in (LayerNorms' do not decay)
            names = super().get_decay_parameter_names(model.pack.model)
            return [mine for n in names if (mine := model.mine(n)) is not None]
        return super().get_decay_parameter_names(model)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if isinstance(self.model, LaneView):  # a packed trial's adapter, in the PEFT model's other adapters
            return self.model.load(resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save(self, output_dir=None, state_dict=None):
        if isinstance(self.model, LaneView):  # its adapter, as a trial of its own saves it (no credentials in it)
            return self.model.save(output_dir or self.args.output_dir)
        # The Trainer pickles self.args into every checkpoint (training_args.bin): a credential (hub_token)
        # would lie there in clear, in a folder an interrupted trial keeps. Saved without it.
        args = self.args
        if not any(getattr(args, name, None) for name in CREDENTIALS):
            return super()._save(output_dir, state_dict)
        self.args = copy.copy(args)
        for name in CREDENTIALS:
            setattr(self.args, name, None)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            self.args = args

    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self.knobs.own_optimizer:
            return super().create_optimizer(model)
        model = model or self.model
        a, r = self.args, self.knobs
        head_lr = r.head_learning_rate or a.learning_rate * (r.head_lr_multiplier or 1.0)
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault((is_head(name, self.heads), name in decay), []).append(p)
        param_groups = [
            {
                "params": ps,
                "lr": head_lr if head else a.learning_rate,
                "head": head,
                "weight_decay": a.weight_decay if decays else 0.0,
            }
            for (head, decays), ps in sorted(groups.items())
        ]
        if r.optimizer is None:  # layer-wise rates with TrainingArguments' own optim
            cls, kwargs = self.get_optimizer_cls_and_kwargs(a, model)
        else:
            cls, kwargs = OPTIMIZERS[r.optimizer], {"lr": a.learning_rate}
            if r.optimizer in ("sgd", "rmsprop"):
                kwargs["momentum"] = r.momentum
            elif r.optimizer == "adafactor":
                kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
            else:
                kwargs.update(betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
        kwargs.pop("lr", None)  # each group has its own
        if r.optimizer is not None:
            kwargs.update(fastest_kernel(cls, [p for g in param_groups for p in g["params"]]))
        self.optimizer = cls(param_groups, **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        r = self.knobs
        if self.lr_scheduler is not None or r.schedule is None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        for group in optimizer.param_groups:  # LambdaLR sets it; ReduceLROnPlateau does not
            group.setdefault("initial_lr", group["lr"])
        if r.schedule == "reduce_lr_on_plateau":
            self.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=r.lr_plateau_factor, patience=r.lr_plateau_patience
            )
        else:
            warmup = self.args.get_warmup_steps(num_training_steps)
            size = r.lr_step_size or 1 / 3
            size = max(1, math.ceil(size * num_training_steps) if size < 1 else int(size))

            def factor(step: int) -> float:
                if step < warmup:
                    return step / warmup  # linear warmup, as transformers' schedules do
                return r.lr_gamma ** ((step - warmup) // size)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # Evaluation under several processes: every rank evaluates every eval row, and nothing is gathered.
    # The Trainer's own way shards the rows and pads each rank's last batch by cycling through the data, then
    # averages per-batch means: with 6 eval rows and 2 ranks the eval loss was 0.3% off the true one (a
    # re-evaluation of the saved model), the same for every trial but not the number hpo reports. Exact is
    # worth the idle ranks: the evaluation is not split, but every rank runs the same forwards (FSDP needs it).
    def get_eval_dataloader(self, eval_dataset=None):
        loader = super().get_eval_dataloader(eval_dataset)
        shard = loader.batch_sampler  # accelerate's BatchSamplerShard: the whole set, no batch padded by cycling
        if self.args.world_size > 1 and hasattr(shard, "num_processes"):
            shard.num_processes, shard.process_index, shard.even_batches = 1, 0, False
        return loader

    def evaluation_loop(self, *args, **kwargs):
        if self.args.world_size > 1:
            self.gather_function = lambda tensors: tensors  # every rank has them all; the loop resets it
        return super().evaluation_loop(*args, **kwargs)
