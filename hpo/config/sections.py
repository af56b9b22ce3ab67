"""The sections of a study file: pydantic models of ``model:``, ``data:``, ``eval_every:``, ``objective:``,
``sampler:``, ``pruner:`` and the rest, with a description on every field.

:class:`hpo.config.models.StudyConfig` holds them; each validates its own keys and nothing beyond them (checks
across sections are in :mod:`hpo.config.validate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hpo import samplers
from hpo.config.clusters import KubernetesSettings, SlurmSettings
from hpo.config.strict import Strict
from hpo.tasks import COST_METRICS, HIGHER_IS_BETTER

#: The most trials a pack holds (resources.pack)
MAX_PACK = 32
DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".conll")


class LoraSettings(Strict):
    """Fixed LoRA settings (PEFT ``LoraConfig`` names); the search space may override any."""

    r: PositiveInt = Field(
        8, description="Rank of each adapter: its capacity, memory and time grow with it. 8 is PEFT's default."
    )
    lora_alpha: PositiveFloat = Field(
        16,
        description="Scale of the adapter's update (multiplied by lora_alpha / r); "
        "16 is twice the default r, a common start.",
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on each adapter's input, in [0, 1).")
    target_modules: list[str] | str | None = Field(
        None,
        description="The modules that get adapters, by name: a list (e.g. [query, value]), a comma-separated "
        "string, or all-linear; "
        "default: PEFT's choice for the architecture.",
    )


class Quantization(Strict):
    """4- or 8-bit weights through bitsandbytes (QLoRA); the adapters train in ``compute_dtype``."""

    bits: Literal[4, 8] = Field(
        4,
        description="Bits per frozen weight: 4 (QLoRA) or 8; searchable as bits: {type: categorical, choices: [4, 8]}.",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="The 4-bit data type: nf4 (QLoRA's normal float) or fp4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too: ~0.4 bits per weight less.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="The dtype the layers compute in; bfloat16 needs an Ampere or newer GPU."
    )


def _pack(value: Any) -> Any:
    """resources.pack in one message (pydantic's would be one per member of the union)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PACK):
        return value
    raise ValueError(f"{value!r}: 1 to {MAX_PACK} trials at once, or auto")


class Resources(Strict):
    """What a trial may use on this machine."""

    max_memory_gb: PositiveFloat | None = Field(
        None,
        description="The memory one trial may take (GB): on CUDA the allocator's cap, on CPU the trial's peak "
        "resident memory above the process's before it. A trial that runs out trains again at half the "
        "per-device batch and twice the accumulation. Default: the device's.",
    )
    processes_per_trial: PositiveInt = Field(
        1,
        description="Each trial runs as a torch.distributed job of this many processes on this machine (gloo on "
        "CPU, NCCL on GPU, one GPU each); the global batch is the per-device batch × accumulation × processes. "
        "hpo run --workers N needs N × this many GPUs (on CPU: cores).",
    )
    nodes_per_trial: PositiveInt = Field(
        1,
        description="Each trial's ranks span this many machines, processes_per_trial on each (torchrun's c10d "
        "rendezvous); the global batch counts every rank. The launcher starts the other machines' agents.",
    )
    launcher: Literal["srun", "local"] = Field(
        "srun",
        description="How a trial of nodes_per_trial over 1 reaches its machines: srun, within the worker's Slurm "
        "allocation (hpo submit --slurm asks for the nodes); local: every node's agent on this machine, a "
        "rehearsal of the rendezvous.",
    )
    pack: Annotated[Annotated[int, Field(ge=1, le=MAX_PACK)] | Literal["auto"], BeforeValidator(_pack)] = Field(
        1,
        description="LoRA trials a worker trains at once over one copy of the base model, in one forward and "
        "backward pass for all of them (each trial its own adapter, optimizer and schedule); a trial that ends "
        "gives its place to the next. Pays where a GPU idles between small kernels; 1: one trial at a time; "
        "auto: as many as the GPU's free memory holds at hpo check's hungriest corner (1 on the CPU).",
    )
    slurm: SlurmSettings = Field(SlurmSettings(), description="hpo submit --slurm: setup line, #SBATCH options.")
    kubernetes: KubernetesSettings = Field(
        KubernetesSettings(), description="hpo submit --kubernetes: image, namespace, Secret, grace period."
    )

    @property
    def ranks(self) -> int:
        """The processes of one trial, on all its nodes: the devices its global batch counts."""
        return self.nodes_per_trial * self.processes_per_trial


class ModelConfig(Strict):
    """A pretrained model (``name``), or a small random-init one built from ``config`` (demos, tests)."""

    name: str | None = Field(
        None,
        min_length=1,
        description="A local folder (relative to the study file) or a Hugging Face hub id, found in the cache first.",
    )
    config: dict[str, Any] | None = Field(
        None,
        description="Instead of name: AutoConfig.for_model arguments for a small random-init model, "
        "e.g. {architecture: gpt2, n_layer: 2}; needs a tokenizer.",
    )
    tokenizer: str | None = Field(
        None, min_length=1, description="A tokenizer folder or hub id; default: the model's own."
    )
    lora: LoraSettings | None = Field(
        None,
        description="Fine-tune LoRA adapters with these settings instead of "
        "every weight (LoRA names in the search space do so too).",
    )
    quantization: Quantization | None = Field(
        None,
        description="Load the frozen weights in 4 or 8 bits (bitsandbytes, CUDA) and train LoRA adapters over "
        "them (QLoRA): {bits: 4, type: nf4, double_quant: true, compute_dtype: bfloat16}.",
    )

    @model_validator(mode="after")
    def _name_or_config(self) -> ModelConfig:
        if (self.name is None) == (self.config is None):
            raise ValueError("give a model name (hub id or folder), or a config: {architecture: ...} with a tokenizer")
        if self.config is not None and not isinstance(self.config.get("architecture"), str):
            raise ValueError("config needs architecture: a transformers model type such as gpt2, bert or llama")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a model built from a config needs a tokenizer (folder or hub id)")
        return self

    @property
    def label(self) -> str:
        """How the model is named in reports and model cards."""
        return self.name or f"{self.config['architecture']} built from a config"


class DataConfig(Strict):
    """The train and eval files, and the columns the task reads."""

    train: Path = Field(description="Training rows: .csv, .jsonl, .json or .conll, relative to the study file.")
    eval: Path = Field(
        description="Evaluation rows, which every metric and the objective are measured on; the same formats as train."
    )
    test: Path | None = Field(
        None,
        description="Held-out rows never used to choose: the top trials (by eval) are evaluated on them once, "
        "when they finish, and hpo report and hpo best show it beside eval. The same formats as train.",
    )
    text_column: str = Field(
        "text", description="The input text (sequence-classification; causal-lm without prompt_column)."
    )
    label_column: str = Field("label", description="The class label (sequence-classification).")
    tokens_column: str = Field(
        "tokens",
        description="The list of tokens (token-classification, JSON Lines; .conll files have token and tag columns).",
    )
    tags_column: str = Field("tags", description="One tag per token, IOB2: B-PER, I-PER, O (token-classification).")
    prompt_column: str | None = Field(
        None,
        description="causal-lm: the prompt; with response_column, the loss "
        "is on the response only. Default: on the whole text.",
    )
    response_column: str | None = Field(
        None, description="causal-lm: the response to learn, after prompt_column; the two go together."
    )
    format: Literal["text", "chat"] = Field(
        "text",
        description="causal-lm: chat reads conversations (JSON Lines or JSON: messages_column, a list of {role, "
        "content}), renders them with the tokenizer's chat template (or data.template) and learns the assistant "
        "turns only. text: the columns above.",
    )
    messages_column: str = Field("messages", description="format: chat: the conversation, a list of {role, content}.")
    template: str | None = Field(
        None,
        min_length=1,
        description="format: chat: a Jinja chat template, for a tokenizer that has none (or to replace its own).",
    )
    max_length: int = Field(
        128, gt=0, le=2**20, description="Tokens per row; longer rows are truncated. At most the model's positions."
    )
    max_train_rows: PositiveInt | None = Field(
        None,
        description="Train on a random slice of this many rows "
        "(seed 0), for quick runs, e.g. in a dev "
        "environment; default: every row.",
    )
    max_eval_rows: PositiveInt | None = Field(
        None, description="Evaluate on a random slice of this many rows (seed 0); default: every row."
    )

    @field_validator("train", "eval", "test")
    @classmethod
    def _exists(cls, p: Path | None, info: ValidationInfo) -> Path | None:
        if p is None:
            return None
        p = (info.context or {}).get("root", Path.cwd()) / p
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"{p.name}: data files are {', '.join(DATA_SUFFIXES)}")
        if not p.is_file():
            raise ValueError(f"file not found: {p}")
        return p


class EvalEvery(Strict):
    """Distance between evaluations (= pruning points): a fraction of an epoch, or examples."""

    epochs: PositiveFloat | None = Field(
        None, description="Epochs between evaluations: 0.25 evaluates four times per epoch."
    )
    examples: PositiveInt | None = Field(None, description="Training examples seen between evaluations.")

    @model_validator(mode="before")
    @classmethod
    def _number_is_epochs(cls, v: Any) -> Any:
        return {"epochs": v} if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_of(self) -> EvalEvery:
        if (self.epochs is None) == (self.examples is None):
            raise ValueError("give a number of epochs (e.g. 0.25) or {examples: N}")
        return self

    def examples_between(self, n_train: int) -> float:
        """Examples seen between two evaluations."""
        return self.examples if self.examples is not None else self.epochs * n_train


class EvalGrid(EvalEvery):
    """``eval_every``: the distance between evaluations, and how many eval rows the ones before the last use."""

    subsample: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of the eval rows (a fixed sample, stratified by label) that the evaluations before the "
        "last one use: a pruning point needs a ranking, not a precise number. The last evaluation, whose value "
        "is the trial's, always uses every row. 1: every row at every point. Not used with objective.at: best, "
        "early_stopping or objectives, whose earlier evaluations can be the value.",
    )
    subsample_min_rows: PositiveInt = Field(
        100, description="The subsample has at least this many rows (every row, when the eval set has fewer)."
    )


class Objective(Strict):
    """The metric that ranks trials, and which way is better."""

    metric: str = Field(
        "eval_loss",
        description="A metric the task reports (eval_loss, eval_accuracy, "
        "eval_f1, ...); eval_loss, because every task reports it.",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None,
        description="Default: the metric's own (minimize eval_loss and eval_perplexity, maximize accuracy, "
        "F1, precision and recall).",
    )
    at: Literal["last", "best"] = Field(
        "last",
        description="The trial's value: the metric at its last evaluation (the model it ends with), or at its "
        "best one, whose model is kept (in memory) and saved as the trial's.",
    )

    @model_validator(mode="after")
    def _infer_direction(self) -> Objective:
        known = self.metric in HIGHER_IS_BETTER or self.metric in COST_METRICS
        higher = HIGHER_IS_BETTER.get(self.metric, not self.metric.endswith("loss"))
        own = "maximize" if higher and self.metric not in COST_METRICS else "minimize"
        if self.direction is None:
            self.direction = own
        elif known and self.direction != own:  # "best" would be the worst model
            better = "higher" if own == "maximize" else "lower"
            raise ValueError(f"direction: {better} is better for {self.metric}: {own} it, or leave direction out")
        return self


class EarlyStopping(Strict):
    """End a trial that stopped improving: COMPLETE with ``stopped_early``, at its best evaluation's value."""

    patience: PositiveInt = Field(description="Evaluations in a row without improvement before the trial stops.")
    min_delta: float = Field(
        0.0, ge=0, description="What counts as an improvement: better than the best so far by more than this."
    )


class SamplerSpec(BaseModel):
    """``name`` plus the sampler's own keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: Literal[tuple(samplers.SAMPLERS)] = Field(  # type: ignore[valid-type]
        "tpe",
        description="The Optuna sampler that picks each trial's parameters; the other keys are its "
        "arguments (e.g. seed). tpe: learns from finished trials, good from ~10 trials on.",
    )

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrunerSpec(SamplerSpec):
    """``name`` plus the pruner's own keyword arguments, and hpo's ``min_optimizer_steps``."""

    name: Literal[tuple(samplers.PRUNERS)] = Field(  # type: ignore[valid-type]
        "median",
        description="The Optuna pruner that stops unpromising trials at an evaluation; the other keys "
        "are its arguments. median: stops a trial worse than the median of earlier ones "
        "at the same step, once 3 trials finished (hpo's default n_startup_trials for median and percentile; "
        "Optuna's is 5); none: never stops one.",
    )
    min_optimizer_steps: NonNegativeInt = Field(
        3,
        description="No trial is pruned before it has made this many optimizer steps (hpo's, not the pruner's "
        "argument). Evaluations compare trials at equal examples seen, where a trial with gradient "
        "accumulation 4 has made a quarter of the steps of one with 1: this keeps the pruner from judging it "
        "on its first few.",
    )
