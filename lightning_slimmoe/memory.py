"""The memory plan of a run: GiB per rank in every phase of every stage, read from the recipe (``plan --memory``), and
the check ``train`` makes with it before any weight is read (``memory_plan.check``).

An estimate from shapes and parameter counts (the models built on the meta device), not a measurement. It reads what
the run will do: the world size (``trainer.devices`` x ``trainer.num_nodes``), the strategy (``auto`` / DDP: every
rank holds whole models; ``ModelParallelStrategy``: FSDP2, everything sharded over all ranks; ``FSDPStrategy``: FSDP1
with its ``sharding_strategy`` and ``cpu_offload``), the precision and ``parallel.param_dtype`` (weights, compute and
teacher dtypes), ``parallel.activation_checkpointing`` and ``reshard_after_forward``, each stage's optimizer,
criterion, calibration batch and KD chunk, ``teacher_8bit``, ``teacher_cache``, the micro-batch and ``seq_len``.

Phases of a stage, and what each holds per rank (``P`` parameters, ``/S`` sharded over the ranks FSDP shards over):

* ``load`` — the teacher (loaded once, kept for the whole run) and the incoming student. FSDP2 builds both on the
  meta device and reads each rank's rows (its shards plus one tensor's rows); every other strategy loads whole
  models (FSDP1 on the host, then wraps them; ``host_gib_per_node`` in the JSON) with ``from_pretrained``, whose
  zero-copy views of the checkpoint file (embeddings, head) are copied once loaded (loading.own_mapped_tensors_).
* ``score`` — a pruning stage's importance scoring of the full-size incoming student on calibration batches of
  ``calibration_batch_size`` sequences, every rank the whole batch. ``kd_taylor`` / ``kd_fisher`` run the teacher
  and a student backward: the gradients of the scored weights (experts, shared experts, attention; ``kd_fisher``:
  the removal weights) and the activations, per-layer checkpointed with ``parallel.activation_checkpointing``;
  ``activation`` and expert removal run the student forward only; ``magnitude`` / ``random`` and ``scores_file``
  no forward at all. Only FSDP2 scores sharded: the others score whole models on every rank.
* ``train`` — the KD step of the sliced student: weights, gradients, optimizer state (AdamW: two moments in the
  weights' dtype; bitsandbytes AdamW8bit: 2 bytes per parameter), the teacher's weights, FSDP's gathered
  parameters (the current and the prefetched decoder layer of each model in the compute dtype, the embeddings and
  the output head, the unsharded gradient of one layer; every student layer where parameters stay gathered from
  forward to backward), the activations at ``batch_size x seq_len`` tokens (with per-layer checkpointing — FSDP2
  and FSDP1 only — each layer's input plus one layer's recompute; without it every layer's saved tensors), and
  three fp32 ``[kd.chunk_tokens, V]`` blocks of the KD loss and its fp32 ``[V, H]`` head-gradient accumulator (with
  its cast to the weights' dtype). With ``teacher_cache`` no teacher forward runs in a
  KD step, but the teacher stays loaded (validation, scoring and agreement run it).
* ``validate`` — forward only at ``val_batch_size``; the optimizer state is still held (validation inside the fit).
* ``export`` — after the fit, whose optimizer state and gradients are freed (pipeline.run_stage). FSDP2 gathers one
  tensor at a time; the others hold a whole copy of the student on rank 0 (and, unsharded, the reloaded export it
  is compared with).

Activations per token and layer (saved for backward, compute dtype): attention ``4 H + 3 q + 2 k + v + o`` (the two
norms' inputs and outputs, the projections and their rotated copies, the attention output), routed experts
``top_k (2 H + 3 I) + 2 E`` (each routed copy's input, gate/up, activation and output; the router logits in fp32),
a shared expert ``2 H + 3 I_shared``; a teacher's forward holds one such layer at a time.

A phase fits when its total is at most 90% of the device's memory (``RESERVED_FRACTION``: the CUDA context, NCCL
buffers and the allocator's fragmentation). Where a stage does not fit, the plan says what would make it fit: each
single change a practitioner would make, planned again, and the fewest nodes that hold it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lightning_slimmoe.config import ConfigError, MemoryPlanConfig, ParallelConfig, RunConfig, StageConfig
from lightning_slimmoe.families import get_family, head_dim
from lightning_slimmoe.models import model_on_meta
from lightning_slimmoe.params import count_params
from lightning_slimmoe.planning import Shapes, mla_head_dims, precision_dtypes

GiB = 2**30
RESERVED_FRACTION = 0.1  # of each device's memory: CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_GPU_MEMORY_GIB = 80.0  # an 80 GB H100 / A100: what `plan` assumes where a recipe names no GPU memory
PHASES = ("load", "score", "train", "validate", "export")
FSDP1_SHARDED_OVER_NODE = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
FSDP1_GATHERED_UNTIL_BACKWARD = ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2")
EXPORT_SHARD_BYTES = 2 * GiB  # rank 0's output safetensors shard (export.py)
STRATEGY_NAMES = {"single": "one device, nothing sharded", "ddp": "DDP, nothing sharded",
                  "fsdp2": "FSDP2 (ModelParallelStrategy)", "fsdp1": "FSDP1 (FSDPStrategy)"}


# ---------------------------------------------------------------------------------------------------
# What a model holds: parameter counts and shapes, from its config on the meta device
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelProfile:
    params: int
    active: int
    embedding: int  # the input embedding
    head: int  # the output head (0 when tied to the embedding)
    largest_layer: int  # parameters of the largest decoder layer
    largest_tensor: int  # elements of the largest tensor
    scored: int  # the weights kd_taylor takes gradients of: experts, shared experts, attention
    removal: int  # the weights kd_fisher takes gradients of (importance.removal_parameters)
    int8: int  # the weights teacher_8bit holds in int8: fused experts and the decoder layers' nn.Linear but routers
    layers: int
    hidden: int
    vocab: int
    activation_elements: float  # saved for backward per token and layer (module docstring)
    attention_width: int  # heads x (q/k head dim + v head dim): attention FLOPs per token and context position / 2
    attention_layers: tuple[tuple[str, int | None], ...] = ()  # (layer type, window or chunk) of every softmax-attention layer


_PROFILES: dict[str, ModelProfile] = {}


def model_profile(config) -> ModelProfile:
    """:class:`ModelProfile` of the causal LM ``config`` describes (kept per config: fixes are planned repeatedly)."""
    key = f"{type(config).__name__}:{config.to_json_string(use_diff=False)}"
    if key not in _PROFILES:
        _PROFILES[key] = _measure(config)
    return _PROFILES[key]


def _measure(config) -> ModelProfile:
    from lightning_slimmoe.importance import removal_parameters, scored_parameters

    model = model_on_meta(config)
    family = get_family(config)
    counts = count_params(model)
    embedding = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = 0 if head_module is None or head_module.weight is embedding else head_module.weight.numel()
    layers = family.decoder_layers(model)
    routers = {id(family.router(block)) for _, block in family.moe_blocks(model)}
    int8 = 0
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear) and id(module) not in routers:
                int8 += module.weight.numel()
    for _, block in family.moe_blocks(model):
        int8 += block.experts.gate_up_proj.numel() + block.experts.down_proj.numel()
    return ModelProfile(
        params=counts.total, active=counts.active, embedding=embedding.numel(), head=head,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        largest_tensor=max(p.numel() for p in model.parameters()),
        scored=sum(p.numel() for p in scored_parameters(model)),
        removal=sum(p.numel() for p in removal_parameters(model)),
        int8=int8, layers=len(layers), hidden=int(config.hidden_size), vocab=int(config.vocab_size),
        activation_elements=activation_elements(config), attention_width=attention_width(config),
        attention_layers=_attention_layers(config, layers))


def attention_width(config) -> int:
    mla = mla_head_dims(config)
    d_qk, d_v = mla.get("qk_head_dim", head_dim(config)), mla.get("v_head_dim", head_dim(config))
    return int(config.num_attention_heads) * (d_qk + d_v)


def _attention_layers(config, layers) -> tuple[tuple[str, int | None], ...]:
    """(layer type, window) of every softmax-attention layer (not GatedDeltaNet / Mamba): a sliding window's size,
    a chunked layer's chunk, None for full attention."""
    types = list(getattr(config, "layer_types", None) or [])
    found = []
    for i, layer in enumerate(layers):
        if getattr(layer, "self_attn", None) is None:
            continue
        kind = types[i] if i < len(types) else "full_attention"
        window = {"sliding_attention": getattr(config, "sliding_window", None),
                  "chunked_attention": getattr(config, "attention_chunk_size", None)}.get(kind)
        found.append((kind, int(window) if window else None))
    return tuple(found)


def activation_elements(config) -> float:
    """Elements saved for backward per token by the largest decoder layer (module docstring)."""
    family = get_family(config)
    hidden = int(config.hidden_size)
    mla = mla_head_dims(config)
    d_qk, d_v = mla.get("qk_head_dim", head_dim(config)), mla.get("v_head_dim", head_dim(config))
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    q, k, v, o = heads * d_qk, kv_heads * d_qk, kv_heads * d_v, heads * d_v
    lora = int(getattr(config, "q_lora_rank", None) or 0) + int(getattr(config, "kv_lora_rank", None) or 0)
    attention = 4 * hidden + 3 * q + 2 * k + v + o + lora
    experts = int(config.num_experts_per_tok) * (2 * hidden + 3 * family.expert_width(config)) \
        + 2 * family.num_experts(config)
    shared = family.shared_expert_width(config)
    return float(attention + experts + (2 * hidden + 3 * shared if shared else 0))


# ---------------------------------------------------------------------------------------------------
# The hardware and strategy a run uses, from a Trainer (train) or the recipe's trainer section (plan)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSetup:
    accelerator: str  # "gpu" | "cpu"
    devices: int  # per node
    num_nodes: int
    strategy: str  # "single" | "ddp" | "fsdp2" | "fsdp1"
    precision: str
    fsdp1_sharding: str = "FULL_SHARD"
    cpu_offload: bool = False  # FSDP1: parameters, gradients and optimizer state on the host

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def shards(self) -> int:
        """Ranks every sharded tensor is split over (1: whole on every rank)."""
        if self.strategy == "fsdp2":
            return self.world_size
        if self.strategy == "fsdp1":
            if self.fsdp1_sharding == "NO_SHARD":
                return 1
            return self.devices if self.fsdp1_sharding in FSDP1_SHARDED_OVER_NODE else self.world_size
        return 1

    def describe(self) -> str:
        what = STRATEGY_NAMES[self.strategy]
        if self.strategy == "fsdp1":
            what += f" {self.fsdp1_sharding}" + (", cpu_offload" if self.cpu_offload else "")
        nodes = f"{self.num_nodes} x {self.devices} = {self.world_size}" if self.num_nodes > 1 else str(self.devices)
        return f"{nodes} {'CPU rank' if self.accelerator == 'cpu' else 'GPU'}{'s' if self.world_size > 1 else ''}, " \
               f"{what}, precision {self.precision}"


def setup_from_trainer(trainer) -> TrainingSetup:
    """``train``: the Trainer built from the recipe (Lightning has resolved devices, strategy and precision)."""
    from lightning.pytorch.accelerators import CPUAccelerator

    accelerator = "cpu" if isinstance(trainer.accelerator, CPUAccelerator) else "gpu"
    return _setup(accelerator, int(trainer.num_devices), int(trainer.num_nodes), trainer.strategy,
                  str(trainer.precision))


def setup_from_section(section: dict) -> TrainingSetup:
    """``plan``: the recipe's ``trainer`` section as parsed (``strategy`` a name or the instantiated class). A GPU
    count of ``auto`` / ``-1`` is this machine's (1 where none is visible)."""
    accelerator = section.get("accelerator") or "auto"
    if not isinstance(accelerator, str):
        accelerator = "cpu" if type(accelerator).__name__ == "CPUAccelerator" else "gpu"
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    accelerator = "cpu" if accelerator == "cpu" else "gpu"
    return _setup(accelerator, _device_count(section.get("devices", "auto"), accelerator),
                  int(section.get("num_nodes") or 1), section.get("strategy") or "auto",
                  str(section.get("precision") or "32-true"))


def _device_count(devices, accelerator: str) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return max(1, torch.cuda.device_count()) if accelerator == "gpu" else 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        return max(1, int(text))
    except ValueError:
        raise ConfigError(f"trainer.devices={devices!r}: the memory plan needs a device count (an int, a list of "
                          "ids, or auto)") from None


def _setup(accelerator: str, devices: int, num_nodes: int, strategy, precision: str) -> TrainingSetup:
    from lightning.pytorch.strategies import (DDPStrategy, FSDPStrategy, ModelParallelStrategy,
                                              SingleDeviceStrategy)

    world = devices * num_nodes
    common = dict(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision)
    if isinstance(strategy, ModelParallelStrategy):
        return TrainingSetup(strategy="fsdp2", **common)
    if isinstance(strategy, FSDPStrategy):
        offload = getattr(strategy.cpu_offload, "offload_params", bool(strategy.cpu_offload))
        return TrainingSetup(strategy="fsdp1", fsdp1_sharding=strategy.sharding_strategy.name,
                             cpu_offload=bool(offload), **common)
    if isinstance(strategy, DDPStrategy):
        return TrainingSetup(strategy="ddp", **common)
    if isinstance(strategy, SingleDeviceStrategy):
        return TrainingSetup(strategy="single", **common)
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if name in ("fsdp", "fsdp_cpu_offload"):
        return TrainingSetup(strategy="fsdp1", cpu_offload=name == "fsdp_cpu_offload", **common)
    if name == "auto":
        return TrainingSetup(strategy="ddp" if world > 1 else "single", **common)
    if name.startswith("ddp"):
        return TrainingSetup(strategy="ddp", **common)
    if name == "single_device":
        return TrainingSetup(strategy="single", **common)
    raise ConfigError(f"trainer.strategy={name!r}: the memory plan knows auto, ddp, ModelParallelStrategy (FSDP2) and "
                      "FSDPStrategy (FSDP1); use one of those, or set memory_plan.check: off to run it unchecked")


def device_memory_gib(memory_plan: MemoryPlanConfig, setup: TrainingSetup, visible_gib: float | None = None) -> float:
    """The memory of one rank's device: ``memory_plan.device_memory_gib`` (the hardware a recipe names), else
    ``DEFAULT_GPU_MEMORY_GIB`` for GPUs and, for accelerator cpu, this host's RAM shared by the node's ranks.
    ``visible_gib`` (``train`` on a GPU: the device's own memory) replaces the default and caps a larger value: the
    run is checked against the GPUs it has."""
    given = memory_plan.device_memory_gib
    if setup.accelerator == "cpu":
        return float(given) if given is not None else host_memory_bytes() / GiB / setup.devices
    if visible_gib is not None:
        return float(visible_gib) if given is None else min(float(given), float(visible_gib))
    return float(given) if given is not None else DEFAULT_GPU_MEMORY_GIB


def host_memory_bytes() -> int:
    """This machine's RAM (MemTotal of /proc/meminfo, else the physical pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryInputs:
    """Everything the plan depends on; a fix is the same inputs with one thing changed (``dataclasses.replace``)."""

    setup: TrainingSetup
    limit_gib: float  # per rank: (1 - RESERVED_FRACTION) x the device's memory
    device_gib: float
    parallel: ParallelConfig
    teacher_8bit: bool
    teacher_cache: bool
    batch_size: int
    val_batch_size: int
    seq_len: int
    stages: tuple[StageConfig, ...]
    teacher: object  # config
    incoming: tuple  # the student config each stage starts from
    outgoing: tuple  # ... and ends with


@dataclass
class StageMemory:
    name: str
    phases: dict[str, dict[str, float]]  # phase -> term -> GiB
    host_gib_per_node: float  # whole-model loading on the host (unsharded strategies, FSDP1)
    fixes: list[dict] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, float]:
        return {phase: sum(terms.values()) for phase, terms in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.totals
        return max(totals, key=totals.get)

    @property
    def peak_gib(self) -> float:
        return self.totals[self.peak_phase]

    @property
    def binding_term(self) -> tuple[str, float]:
        terms = self.phases[self.peak_phase]
        name = max(terms, key=terms.get)
        return name, terms[name]


@dataclass
class MemoryPlan:
    inputs: MemoryInputs
    stages: list[StageMemory]

    @property
    def limit_gib(self) -> float:
        return self.inputs.limit_gib

    def fits(self, stage: StageMemory) -> bool:
        return stage.peak_gib <= self.limit_gib

    @property
    def peak_gib(self) -> float:
        return max(s.peak_gib for s in self.stages)

    def to_json(self) -> dict:
        x = self.inputs
        return {
            "setup": {**dataclasses.asdict(x.setup), "world_size": x.setup.world_size, "shards": x.setup.shards,
                      "device_memory_gib": round(x.device_gib, 2), "limit_gib": round(x.limit_gib, 2),
                      "activation_checkpointing": x.parallel.activation_checkpointing,
                      "param_dtype": x.parallel.param_dtype, "teacher_8bit": x.teacher_8bit,
                      "teacher_cache": x.teacher_cache, "batch_size": x.batch_size, "seq_len": x.seq_len},
            "peak_gib": round(self.peak_gib, 2), "fits": all(self.fits(s) for s in self.stages),
            "stages": [{"name": s.name, "phases": {p: {**{k: round(v, 2) for k, v in t.items()},
                                                       "total": round(s.totals[p], 2)} for p, t in s.phases.items()},
                        "peak_phase": s.peak_phase, "peak_gib": round(s.peak_gib, 2),
                        "binding_term": {"name": s.binding_term[0], "gib": round(s.binding_term[1], 2)},
                        "fits": self.fits(s), "host_gib_per_node": round(s.host_gib_per_node, 2),
                        "fixes": s.fixes} for s in self.stages],
        }


def memory_inputs(config: RunConfig, shapes: Shapes, setup: TrainingSetup, batch_size: int,
                  val_batch_size: int | None, seq_len: int, visible_gib: float | None = None) -> MemoryInputs:
    """The plan's inputs from the recipe (:class:`RunConfig`, its planned shapes, the data's micro-batch and
    ``seq_len``) and the :class:`TrainingSetup` (``setup_from_trainer`` / ``setup_from_section``); ``visible_gib``:
    :func:`device_memory_gib`."""
    device = device_memory_gib(config.memory_plan, setup, visible_gib)
    first = shapes.initial_config if shapes.initial_config is not None else shapes.teacher_config
    incoming = []
    for k, stage in enumerate(config.stages):
        incoming.append(shapes.configs[k] if stage.pretrain is not None else (shapes.configs[k - 1] if k else first))
    return MemoryInputs(setup=setup, limit_gib=(1 - RESERVED_FRACTION) * device, device_gib=device,
                        parallel=config.parallel, teacher_8bit=config.teacher_8bit,
                        teacher_cache=config.teacher_cache is not None, batch_size=int(batch_size),
                        val_batch_size=int(val_batch_size or batch_size), seq_len=int(seq_len),
                        stages=tuple(config.stages), teacher=shapes.teacher_config, incoming=tuple(incoming),
                        outgoing=tuple(shapes.configs))


def plan_memory(inputs: MemoryInputs, with_fixes: bool = True) -> MemoryPlan:
    """Every phase of every stage (:func:`stage_memory`), and for a stage that does not fit what would."""
    stages = [stage_memory(inputs, k) for k in range(len(inputs.stages))]
    if with_fixes:
        for k, stage in enumerate(stages):
            if stage.peak_gib > inputs.limit_gib:
                stage.fixes = fixes(inputs, k)
    return MemoryPlan(inputs, stages)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def stage_memory(x: MemoryInputs, k: int) -> StageMemory:
    """GiB per rank of every phase of stage ``k`` (module docstring)."""
    setup, par, stage = x.setup, x.parallel, x.stages[k]
    fsdp = setup.strategy in ("fsdp1", "fsdp2")
    student_dtype, teacher_dtype = precision_dtypes(setup.precision)
    teacher_dtype = par.dtype("param_dtype") or teacher_dtype
    sb, tb = _bytes(student_dtype), _bytes(teacher_dtype)
    mixed = "mixed" in setup.precision
    cb = _bytes(par.dtype("param_dtype")) if fsdp and par.param_dtype else (2 if mixed else sb)  # compute dtype
    rb = _bytes(par.dtype("reduce_dtype")) if fsdp and par.reduce_dtype else sb
    shards = setup.shards
    offload = setup.strategy == "fsdp1" and setup.cpu_offload  # FSDP1 cpu_offload: shards live on the host
    on_device = 0 if offload else 1
    distils = stage.pretrain is None
    s_in, s_out = model_profile(x.incoming[k]), model_profile(x.outgoing[k])
    t = model_profile(x.teacher) if distils else None
    ac_train = par.activation_checkpointing and fsdp  # DDP / one device: transformers' checkpointing is not enabled
    gathered_whole = (setup.strategy == "fsdp2" and not par.reshard_after_forward) or (
        setup.strategy == "fsdp1" and setup.fsdp1_sharding in FSDP1_GATHERED_UNTIL_BACKWARD)

    def teacher_bytes(shard: int) -> float:
        if t is None:
            return 0.0
        if x.teacher_8bit:  # int8 weights (+ one fp32 scale per row, negligible), the rest in the teacher's dtype
            return (t.int8 + (t.params - t.int8) * tb) / shard
        return t.params * tb / shard

    def gathered(p: ModelProfile, trainable: bool, whole: bool) -> float:
        """FSDP: the all-gathered compute-dtype parameters of one model at its peak."""
        if not fsdp or p is None:
            return 0.0
        edges = (p.embedding + p.head) * cb  # the base model's and the head's units stay gathered through the step
        layers = p.params * cb if whole else 2 * p.largest_layer * cb  # current + prefetched layer
        return edges + layers + (p.largest_layer * (cb + rb) if trainable else 0)  # + one layer's unsharded grad

    def saved_activations(p: ModelProfile, tokens: int, checkpointed: bool) -> float:
        per_layer = tokens * p.activation_elements * cb
        if checkpointed:  # each layer's input, one layer recomputed, the gradient flowing back
            return p.layers * tokens * p.hidden * cb + per_layer + 2 * tokens * p.hidden * cb
        return p.layers * per_layer + 2 * tokens * p.hidden * cb

    def forward_working_set(p: ModelProfile | None, tokens: int) -> float:
        """A forward without autograd: one layer's intermediates at a time, and the final hidden states."""
        return 0.0 if p is None else tokens * (p.activation_elements + p.hidden) * cb

    def kd_blocks(tokens: int, count: int) -> float:
        return count * 4 * min(stage.kd.chunk_tokens, tokens) * s_out.vocab

    phases: dict[str, dict[str, float]] = {}
    # --- load -----------------------------------------------------------------------------------------
    if setup.strategy == "fsdp2":
        largest = max(s_in.largest_tensor, t.largest_tensor if t else 0)
        phases["load"] = {"teacher_weights": teacher_bytes(shards), "student_weights": s_in.params * sb / shards,
                          "load_buffer": 4 * largest / shards}  # one tensor's rows, dequantized in fp32 at most
        host = 0.0
    else:
        whole = teacher_bytes(1) + s_in.params * sb
        host = setup.devices * whole  # every rank of a node loads both models whole on the host
        if setup.strategy == "fsdp1":  # wrapped unit by unit: each rank keeps its shards on the device
            phases["load"] = {"teacher_weights": on_device * teacher_bytes(shards),
                              "student_weights": on_device * s_in.params * sb / shards,
                              "load_buffer": s_in.largest_layer * sb}
        else:  # from_pretrained, then the copies of its zero-copy views of the file (loading.own_mapped_tensors_);
            # a quantized checkpoint is read tensor by tensor and dequantized in fp32 instead
            phases["load"] = {"teacher_weights": teacher_bytes(1), "student_weights": s_in.params * sb,
                              "load_buffer": max((s_in.embedding + s_in.head) * sb, 4 * s_in.largest_tensor)}
    # --- score ----------------------------------------------------------------------------------------
    if stage.prunes and not stage.scores_file:
        score_shards = shards if setup.strategy == "fsdp2" else 1  # only FSDP2 scores the sharded student
        tokens = stage.calibration_batch_size * x.seq_len
        terms = {"teacher_weights": teacher_bytes(score_shards), "student_weights": s_in.params * sb / score_shards}
        gradient_based = stage.criterion in ("kd_taylor", "kd_fisher")
        forward = gradient_based or stage.criterion == "activation" or stage.remove_experts_to is not None
        if gradient_based:
            graded = s_in.scored if stage.criterion == "kd_taylor" else s_in.removal
            terms["student_grads"] = graded * sb / score_shards
            if score_shards > 1:
                terms["gathered_params"] = max(gathered(s_in, True, False), gathered(t, False, False))
            terms["activations"] = max(saved_activations(s_in, tokens, par.activation_checkpointing),
                                       forward_working_set(t, tokens))
            terms["kd_logits"] = kd_blocks(tokens, 3)
        elif forward:
            if score_shards > 1:
                terms["gathered_params"] = gathered(s_in, False, False)
            terms["activations"] = forward_working_set(s_in, tokens)
        phases["score"] = terms
    # --- train (the KD step) ----------------------------------------------------------------------------
    tokens = x.batch_size * x.seq_len
    live_teacher = distils and not x.teacher_cache
    opt_bytes = 2 if stage.optimizer.name == "adamw8bit" else 2 * sb
    train = {"student_weights": on_device * s_out.params * sb / shards,
             "student_grads": on_device * s_out.params * sb / shards,
             "optimizer_state": on_device * s_out.params * opt_bytes / shards,
             "teacher_weights": on_device * teacher_bytes(shards)}
    if setup.strategy == "ddp" and setup.world_size > 1:
        train["ddp_grad_buckets"] = s_out.params * sb  # DDP's flat gradient buckets, a second copy of the gradients
    if mixed and not fsdp:
        train["autocast_weight_copies"] = s_out.params * cb  # autocast caches each weight's half copy for the step
    if fsdp:
        train["gathered_params"] = max(gathered(s_out, True, gathered_whole),
                                       gathered(t, False, False) if live_teacher else 0.0)
    train["activations"] = max(saved_activations(s_out, tokens, ac_train),
                               forward_working_set(t, tokens) if live_teacher else 0.0)
    train["kd_logits"] = kd_blocks(tokens, 3)
    # The fused KD head accumulates the [V, H] weight gradient in fp32 over the chunks, then casts it to the weights'
    # dtype (distill.py): the whole head, gathered under FSDP too (bench/memory.py measured it in every KD step).
    train["head_grad"] = s_out.vocab * s_out.hidden * (4 + (sb if sb != 4 else 0))
    phases["train"] = train
    # --- validate -------------------------------------------------------------------------------------
    tokens = x.val_batch_size * x.seq_len
    validate = {key: train[key] for key in ("student_weights", "optimizer_state", "teacher_weights")}
    if fsdp:
        validate["gathered_params"] = max(gathered(s_out, False, False), gathered(t, False, False))
    validate["activations"] = max(forward_working_set(s_out, tokens), forward_working_set(t, tokens))
    validate["kd_logits"] = kd_blocks(tokens, 2)
    phases["validate"] = validate
    # --- export ---------------------------------------------------------------------------------------
    export = {key: train[key] for key in ("student_weights", "teacher_weights")}  # optimizer state freed by then
    if setup.strategy == "fsdp2":
        export["gathered_params"] = s_out.largest_tensor * sb  # one tensor at a time, on every rank
        if setup.accelerator == "cpu":
            export["export_buffer"] = min(EXPORT_SHARD_BYTES, s_out.params * sb)
    elif setup.strategy == "fsdp1":
        export["gathered_params"] = s_out.largest_layer * sb
        if setup.accelerator == "cpu":  # rank 0 gathers a plain copy of the student (on the host)
            export["export_buffer"] = s_out.params * sb
    elif setup.accelerator == "cpu":  # the student whole, and its reloaded export compared with it
        export["reloaded_export"] = s_out.params * sb
    phases["export"] = export
    return StageMemory(stage.name, {p: {k2: v / GiB for k2, v in terms.items() if v}
                                    for p, terms in phases.items()}, host / GiB)


# ---------------------------------------------------------------------------------------------------
# What would make a stage fit
# ---------------------------------------------------------------------------------------------------
MAX_NODES = 4096


def _with_stage(x: MemoryInputs, k: int, **changes) -> MemoryInputs:
    stages = list(x.stages)
    stages[k] = replace(stages[k], **changes)
    return replace(x, stages=tuple(stages))


def _with_setup(x: MemoryInputs, **changes) -> MemoryInputs:
    return replace(x, setup=replace(x.setup, **changes))


def fewest_nodes(x: MemoryInputs, k: int) -> int | None:
    """The fewest nodes (of ``trainer.devices`` each) on which stage ``k`` fits, None if none up to MAX_NODES does or
    nothing is sharded over nodes."""
    if x.setup.shards < x.setup.world_size or x.setup.strategy not in ("fsdp1", "fsdp2"):
        return None
    fits = lambda nodes: stage_memory(_with_setup(x, num_nodes=nodes), k).peak_gib <= x.limit_gib
    if not fits(MAX_NODES):
        return None
    low, high = 1, MAX_NODES
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def fixes(x: MemoryInputs, k: int) -> list[dict]:
    """Each single change that a practitioner would try, planned again: ``{"change", "peak_gib", "fits"}``, the ones
    that fit first; more nodes as the fewest that hold the stage."""
    stage, setup, par = x.stages[k], x.setup, x.parallel
    options: list[tuple[str, MemoryInputs]] = []
    fsdp2 = _with_setup(x, strategy="fsdp2", fsdp1_sharding="FULL_SHARD", cpu_offload=False)
    if setup.strategy != "fsdp2":
        options.append(("trainer.strategy: ModelParallelStrategy (FSDP2 per decoder layer)", fsdp2))
    if not par.activation_checkpointing:
        options.append(("parallel.activation_checkpointing: true",
                        replace(x, parallel=replace(par, activation_checkpointing=True))))
    if setup.strategy == "fsdp2" and not par.reshard_after_forward:
        options.append(("parallel.reshard_after_forward: true",
                        replace(x, parallel=replace(par, reshard_after_forward=True))))
    if stage.optimizer.name != "adamw8bit":
        options.append((f"stages[{k}].optimizer.name: adamw8bit",
                        _with_stage(x, k, optimizer=replace(stage.optimizer, name="adamw8bit"))))
    if stage.pretrain is None and not x.teacher_cache:
        options.append(("teacher_cache: DIR (no teacher forward in a KD step)", replace(x, teacher_cache=True)))
    if (stage.pretrain is None and not x.teacher_8bit and setup.strategy in ("single", "ddp")
            and setup.precision not in ("bf16-true", "16-true", "bf16", "16", "half")):
        options.append(("teacher_8bit: true", replace(x, teacher_8bit=True)))
    if stage.kd.chunk_tokens > 1024:
        options.append((f"stages[{k}].kd.chunk_tokens: 1024", _with_stage(x, k, kd=replace(stage.kd, chunk_tokens=1024))))
    if stage.prunes and not stage.scores_file and stage.calibration_batch_size > 1:
        options.append((f"stages[{k}].calibration_batch_size: 1", _with_stage(x, k, calibration_batch_size=1)))
    if x.batch_size > 1:
        options.append(("data.init_args.batch_size: 1", replace(x, batch_size=1, val_batch_size=1)))
    found = []
    for change, changed in options:
        peak = stage_memory(changed, k).peak_gib
        found.append({"change": change, "peak_gib": round(peak, 2), "fits": peak <= x.limit_gib})
    for label, candidate in (("", x), ("with FSDP2 ", fsdp2 if setup.strategy != "fsdp2" else None)):
        if candidate is None:
            continue
        nodes = fewest_nodes(candidate, k)
        if nodes is not None and nodes != setup.num_nodes:
            peak = stage_memory(_with_setup(candidate, num_nodes=nodes), k).peak_gib
            found.append({"change": f"{label}trainer.num_nodes: {nodes} ({nodes * setup.devices} devices)",
                          "peak_gib": round(peak, 2), "fits": True})
    found.sort(key=lambda f: (not f["fits"], f["peak_gib"]))
    if not any(f["fits"] for f in found):
        found.insert(0, combined_fix(x, k))
    return found


def combined_fix(x: MemoryInputs, k: int) -> dict:
    """Where no single change is enough: FSDP2 and activation checkpointing, then the fewest nodes; where no node
    count is enough (one gathered decoder layer alone is too big), also the smallest scoring batch, KD chunk and
    micro-batch. ``fits`` False: no such combination fits this device."""
    stage, changes = x.stages[k], []
    if x.setup.strategy != "fsdp2":
        x = _with_setup(x, strategy="fsdp2", fsdp1_sharding="FULL_SHARD", cpu_offload=False)
        changes.append("trainer.strategy: ModelParallelStrategy")
    if not x.parallel.activation_checkpointing or not x.parallel.reshard_after_forward:
        x = replace(x, parallel=replace(x.parallel, activation_checkpointing=True, reshard_after_forward=True))
        changes.append("parallel.activation_checkpointing: true")
    savers = [(f"stages[{k}].calibration_batch_size: 1", lambda y: _with_stage(y, k, calibration_batch_size=1)),
              (f"stages[{k}].kd.chunk_tokens: 1024",
               lambda y: _with_stage(y, k, kd=replace(stage.kd, chunk_tokens=min(1024, stage.kd.chunk_tokens)))),
              ("data.init_args.batch_size: 1", lambda y: replace(y, batch_size=1, val_batch_size=1))]
    while True:
        if stage_memory(x, k).peak_gib <= x.limit_gib:
            return {"change": "together: " + ", ".join(changes), "peak_gib": round(stage_memory(x, k).peak_gib, 2),
                    "fits": True}
        nodes = fewest_nodes(x, k)
        if nodes is not None:
            peak = stage_memory(_with_setup(x, num_nodes=nodes), k).peak_gib
            changes.append(f"trainer.num_nodes: {nodes} ({nodes * x.setup.devices} devices)")
            return {"change": "together: " + ", ".join(changes), "peak_gib": round(peak, 2), "fits": True}
        if not savers:
            peak = stage_memory(_with_setup(x, num_nodes=MAX_NODES), k).peak_gib
            return {"change": f"devices with more memory: with {', '.join(changes)} on {MAX_NODES} nodes it still needs "
                              f"{gib_text(peak)} GiB (FSDP2 gathers whole decoder layers)", "peak_gib": round(peak, 2),
                    "fits": False}
        change, apply = savers.pop(0)
        x = apply(x)
        changes.append(change)


# ---------------------------------------------------------------------------------------------------
# Output and the train-time check
# ---------------------------------------------------------------------------------------------------
def _headline(plan: MemoryPlan) -> str:
    x = plan.inputs
    ac = "on" if x.parallel.activation_checkpointing else "off"
    return (f"{x.setup.describe()}; {x.device_gib:g} GiB per {'rank' if x.setup.accelerator == 'cpu' else 'GPU'}, "
            f"limit {x.limit_gib:.1f} ({RESERVED_FRACTION:.0%} kept for the CUDA context, NCCL and fragmentation); "
            f"micro-batch {x.batch_size} x {x.seq_len} tokens; activation checkpointing {ac}"
            + ("; teacher_8bit" if x.teacher_8bit else "") + ("; teacher_cache" if x.teacher_cache else ""))


def format_memory(plan: MemoryPlan) -> str:
    """What ``plan --memory`` prints: GiB per rank per phase (the peak marked ``*``), the binding term, the fixes."""
    rows = [("stage", *PHASES, "peak", "binding term", "fits")]
    for s in plan.stages:
        totals, peak = s.totals, s.peak_phase
        term, gib = s.binding_term
        rows.append((s.name, *[("-" if p not in totals else gib_text(totals[p]) + ("*" if p == peak else ""))
                               for p in PHASES], gib_text(s.peak_gib), f"{peak}: {term} {gib_text(gib)}",
                     "yes" if plan.fits(s) else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"memory per rank (GiB): {_headline(plan)}",
             *("  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
               for r in rows)]
    for s in plan.stages:
        if s.host_gib_per_node > plan.inputs.device_gib and plan.inputs.setup.accelerator != "cpu":
            lines.append(f"  {s.name}: loads whole models on the host: {s.host_gib_per_node:,.0f} GiB per node")
        if not plan.fits(s):
            lines.append(f"  {s.name} does not fit; " + describe_fixes(s.fixes))
    return "\n".join(lines)


def gib_text(gib: float) -> str:
    """GiB as the plan prints them: one decimal, two significant digits below 0.1."""
    return f"{gib:.1f}" if gib >= 0.1 or gib == 0 else f"{gib:.2g}"


def describe_fixes(found: list[dict]) -> str:
    fitting = [f for f in found if f["fits"]]
    if fitting:
        return "it fits with any of: " + "; ".join(f"{f['change']} ({gib_text(f['peak_gib'])} GiB)" for f in fitting)
    if found and found[0]["change"].startswith("devices with more memory"):
        return "it needs " + found[0]["change"]
    return "no change the plan tries makes it fit"


def refusal(plan: MemoryPlan, stage: StageMemory) -> str:
    """One line: the stage, the phase, the binding term, the numbers and the fixes."""
    term, gib = stage.binding_term
    return (f"memory: stage {stage.name!r} does not fit: its {stage.peak_phase} phase needs {gib_text(stage.peak_gib)} GiB "
            f"per rank (largest term {term} {gib_text(gib)} GiB), over the limit of {gib_text(plan.limit_gib)} GiB "
            f"({1 - RESERVED_FRACTION:.0%} of {plan.inputs.device_gib:g} GiB; {plan.inputs.setup.describe()}); "
            + describe_fixes(stage.fixes)
            + ". `python -m lightning_slimmoe plan --config ... --memory` shows every phase; memory_plan.device_memory_gib "
              "sets the device's memory, memory_plan.check: warn (or off) runs anyway")


def check_memory(plan: MemoryPlan, mode: str) -> None:
    """``memory_plan.check``: ``error`` raises :class:`ConfigError` for the first stage that does not fit, ``warn`` warns
    for each, ``off`` (the caller does not plan at all) nothing."""
    from lightning.pytorch.utilities import rank_zero_warn

    for stage in plan.stages:
        if plan.fits(stage):
            continue
        if mode == "error":
            raise ConfigError(refusal(plan, stage))
        if mode == "warn":
            rank_zero_warn(refusal(plan, stage))


def recipe_memory_plan(config: RunConfig, shapes: Shapes, setup: TrainingSetup, data_hparams,
                       visible_gib: float | None = None) -> MemoryPlan:
    """The plan of a recipe: ``plan --memory`` (setup from the trainer section) and ``train`` (from its Trainer, with
    the memory of the GPU it runs on)."""
    return plan_memory(memory_inputs(config, shapes, setup, data_hparams.batch_size,
                                     getattr(data_hparams, "val_batch_size", None), data_hparams.seq_len, visible_gib))


def check_run_memory(config: RunConfig, shapes: Shapes, trainer, data_hparams) -> MemoryPlan | None:
    """``train``, before any weight is read: the run's plan, refused (``memory_plan.check: error``) or warned about
    (``warn``) where a phase does not fit; nothing at all with ``off``."""
    if config.memory_plan.check == "off":
        return None
    setup = setup_from_trainer(trainer)
    visible = None
    if setup.accelerator == "gpu" and torch.cuda.is_available():
        visible = torch.cuda.get_device_properties(trainer.strategy.root_device).total_memory / GiB
    plan = recipe_memory_plan(config, shapes, setup, data_hparams, visible)
    check_memory(plan, config.memory_plan.check)
    return plan
