"""The plan printed (and written to plan.txt) before training: every derived value and the rule that chose it."""

from __future__ import annotations

from typing import Any

from difflora.adapter.inject import format_parameter_report, parameter_report
from difflora.config.train import OPTIMIZER_LEARNING_RATES, TrainConfig
from difflora.models.architecture import pipeline_architecture
from difflora.models.quantize import COMPONENT_LABELS
from difflora.training.advice import plan_advice
from difflora.training.check import held_out_source
from difflora.training.memory import MemoryEstimate, estimate_memory
from difflora.training.optimizers import owns_schedule
from difflora.training.outputs import ema_adapter_path
from difflora.training.precision import precision_note
from difflora.training.run import Run
from difflora.training.setup import Models
from difflora.training.text import pipeline_conditioning
from difflora.training.validation import GRID_POINTS
from difflora.training.validation_set import best_adapter_path


def describe_plan(config: TrainConfig, run: Run) -> str:
    """The plan printed (and written to plan.txt) before training: every derived value and its rule."""
    data, models, facts = run.data, run.models, run.record.facts
    plan, identity = data.plan, models.identity
    buckets = ", ".join(f"{bucket}: {count}" for bucket, count in data.buckets.items())
    alpha_note = " (= rank)" if config.alpha is None else ""
    resolution_note = " (the model's native size)" if config.resolution is None else ""
    warmup_note = " (5% of the steps)" if config.lr_warmup_steps is None else ""
    te = "".join(
        f", {name.replace('_', ' ')} lr {facts[name + '_lr']:g}" for name in models.text_encoder_modules
    )
    lr_note = f" (default for a {identity.family} model)" if config.learning_rate is None else ""
    if config.learning_rate is None and config.optimizer in OPTIMIZER_LEARNING_RATES:
        lr_note = f" ({config.optimizer}'s default: it sets its own step size)"
    world = run.accelerator.num_processes
    lines = [
        "Training plan",
        f"  data        {config.data_dir}: {plan.images} images, {plan.examples_per_epoch} per epoch with repeats",
        f"  buckets     {buckets}",
        f"  model       {identity.name} ({_label(models)}, {identity.architecture}, {identity.prediction_type}), "
        f"{run.samples.resolution} px{resolution_note}",
        f"  LoRA        rank {config.rank}, alpha {config.effective_alpha:g}{alpha_note}; "
        f"{COMPONENT_LABELS.get(models.denoiser, models.denoiser)} {len(models.unet_modules)} modules"
        + f" ({_preset(config)}{', '.join(config.effective_unet_targets(identity.model_family))}"
        + (
            f"; default for a {identity.family} model)"
            if config.unet_targets is None and config.targets is None
            else ")"
        )
        + (f", blocks {' '.join(config.blocks)}" if config.blocks else "")
        + "".join(
            f", {name.replace('_', ' ')} {len(found)} modules"
            for name, found in models.text_encoder_modules.items()
        ),
        f"  batch       {config.batch_size} per process x {world} process(es) x accumulation "
        f"{config.gradient_accumulation} = {config.batch_size * world * config.gradient_accumulation} images per step",
        f"  length      {plan.max_steps} steps, {plan.epochs} epoch(s) of {plan.steps_per_epoch} steps ({plan.rule})",
        f"  optimizer   {facts['optimizer']}, lr {facts['learning_rate']:g}{lr_note}{te}, {_schedule(config)}, "
        f"warm-up {facts['lr_warmup_steps']} steps{warmup_note}, grad clip {config.max_grad_norm:g}, "
        f"{_objective(config, run)}, precision {config.mixed_precision}",
        f"  saves       every {run.loop.save_every} steps + at the end -> {run.paths.checkpoints} (keep {config.keep_checkpoints})",
        f"  samples     every {run.loop.sample_every} steps, {len(run.samples.prompts)} prompt(s) x seeds {list(config.sample_seeds)}"
        if run.loop.sample_every
        else "  samples     off",
        f"  output      {run.paths.adapter}",
    ]
    _add_optional_lines(lines, config, run)
    report = format_parameter_report(parameter_report(models.trained_components))
    return "\n".join(lines) + "\n" + report


def _add_optional_lines(lines: list[str], config: TrainConfig, run: Run) -> None:
    """The plan's lines that only some runs have (variants, quantization, validation, notes, advice)."""
    variants = _variants(config, run)
    if variants:
        lines.insert(5, f"  variants    {variants}")
    if run.models.quantized is not None:
        lines.insert(4, f"  quantized   {run.models.quantized.describe()}")
    lines.insert(-1, f"  memory      {_memory_line(config, run)}")
    if run.data.masks:
        lines.insert(2, f"  loss        {run.data.masks}, unmasked pixels weigh {config.unmasked_weight:g}")
    if run.validation is not None:
        lines.insert(-2, f"  validation  {_validation(config, run)}")
    if run.data.regularisation is not None and run.prior is not None:
        lines.insert(-2, f"  prior       {_regularisation(config, run)}")
    elif run.prior is not None:
        lines.insert(-2, f"  preserve    {_preserve(config, run)}")
    if run.ema is not None:
        where = "in CPU memory" if config.ema_on_cpu else f"on {run.ema.device}"
        written = ema_adapter_path(run.paths.adapter).name
        lines.insert(
            -2, f"  average     EMA of the LoRA weights, decay {config.ema:g} (float32, {where}) -> {written}"
        )
    if run.start_step:
        lines.append(f"  resuming    at step {run.start_step}")
    precision = precision_note(config.mixed_precision, run.accelerator.device)
    for note in (*run.data.notes, *([precision] if precision else [])):
        lines.append(f"  note        {note}")
    if not config.quiet_advice:
        lines += [f"  advice      {line}" for line in _advice(config, run)]


def _schedule(config: TrainConfig) -> str:
    if owns_schedule(config.optimizer):
        return "no schedule (schedule-free; its own warm-up)"
    return f"{config.lr_scheduler} schedule"


def _regularisation(config: TrainConfig, run: Run) -> str:
    """--reg-dir: the class images, their balance against the training set, and where drift is measured."""
    regularisation, prior = run.data.regularisation, run.prior
    assert regularisation is not None and prior is not None
    drift = f"drift measured on {len(prior.drift_prompts)} class captions at each checkpoint"
    return f"regularisation: {regularisation.describe()} (--reg-dir {config.reg_dir}); {drift}"


def _preserve(config: TrainConfig, run: Run) -> str:
    """--preserve-base: on what, at what weight and cost, and where the drift is measured."""
    prior = run.prior
    source = (
        f"{len(prior.prompts)} prompts from {config.preserve_prompts}"
        if prior.prompts
        else f"the captions without {prior.trigger!r}"
    )
    drift = f"drift measured on {len(prior.drift_prompts)} trigger-free prompts at each checkpoint"
    if not prior.weight:
        return f"--prior-weight 0: no preservation loss; {drift}"
    cost = "one extra forward without gradients and one with them per micro-batch"
    return f"the base model's own predictions on {source}, weight {prior.weight:g} ({cost}); {drift}"


def _validation(config: TrainConfig, run: Run) -> str:
    """Which images are held out, and when and how their loss is measured."""
    held = run.validation.dataset.examples if run.validation is not None else []
    when = f"every {config.validate_every} steps, " if config.validate_every else ""
    best = f"; --keep-best -> {best_adapter_path(run.paths.adapter).name}" if config.keep_best else ""
    source = held_out_source(config.validation_split, config.validation_dir, held)
    levels = f"loss at {GRID_POINTS} fixed noise levels with fixed noise"
    return f"{source}; {levels}, {when}at each checkpoint and at the end{best}"


def _advice(config: TrainConfig, run: Run) -> list[str]:
    """One line per setting outside its usual range (difflora.training.advice)."""
    facts = run.record.facts
    return plan_advice(
        rank=config.rank,
        alpha=config.effective_alpha,
        rslora=config.rslora,
        learning_rate=float(facts["learning_rate"]),
        default_lr=run.models.identity.model_family.default_learning_rate,
        optimizer=str(facts["optimizer"]),
        model=_label(run.models),
    )


def _preset(config: TrainConfig) -> str:
    """ "attention-mlp: " where --targets chose the targets by preset name."""
    return f"{config.targets}: " if config.targets and config.unet_targets is None else ""


def _objective(config: TrainConfig, run: Run) -> str:
    """The noising settings that apply: σ sampling for flow matching (min-SNR weighting and the noise
    offset are ε/v settings that a flow objective does not use, so the plan does not list them)."""
    flow = run.objective.flow
    if flow is None:
        return f"min-SNR-γ {config.min_snr_gamma:g}, noise offset {config.noise_offset:g}"
    sampling = flow.sampling
    return (
        f"flow matching, timesteps {sampling.kind} (mean {sampling.mean:g}, scale {sampling.scale:g}, "
        f"shift {sampling.shift:g})"
    )


def _label(models: Models) -> str:
    """The base as users name it ("SDXL base", "SD 2.x (v-prediction, 768 px)", "custom architecture")."""
    architecture = pipeline_architecture(models.pipe)
    return architecture.label if architecture is not None else models.identity.model_family.label


def _variants(config: TrainConfig, run: Run) -> str:
    """The LoRA variants chosen, as the plan names them (empty for plain LoRA)."""
    chosen = [run.ranks.schedule.describe()] if run.ranks is not None else []
    if config.rslora:
        chosen.append(f"rsLoRA (scale alpha/sqrt(rank) = {config.effective_alpha / config.rank**0.5:g})")
    if config.conv_rank:
        alpha = config.conv_alpha if config.conv_alpha is not None else config.conv_rank
        chosen.append(f"LoCon (ResNet 3x3 convs at rank {config.conv_rank}, alpha {alpha:g})")
    if config.dora:
        chosen.append("DoRA (a trained magnitude per output row over the LoRA direction)")
    if config.loraplus_ratio != 1:
        chosen.append(f"LoRA+ (B at {config.loraplus_ratio:g}x the learning rate)")
    return "; ".join(chosen)


def _memory_line(config: TrainConfig, run: Run) -> str:
    """The estimate, or why there is none: a layer the meta device cannot run (bitsandbytes' quantized
    layers keep their weights in their own CUDA formats) must not stop the run the plan describes."""
    try:
        return plan_memory(config, run).describe()
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"not estimated ({type(error).__name__}: {reason[:120]})"


def plan_memory(config: TrainConfig, run: Run) -> MemoryEstimate:
    """The run's estimated peak memory on its device (difflora.training.memory)."""
    models = run.models
    family = models.identity.model_family
    conditioning = pipeline_conditioning(models.pipe)
    batch, resolution = config.batch_size, run.samples.resolution
    return estimate_memory(
        models.pipe,
        family.denoiser_of(models.pipe),
        family.swappable_blocks,
        lambda model: conditioning.probe(models.pipe, model, batch, resolution),
        probe_key=_probe_key(models.pipe, conditioning, batch, resolution),
        swap=models.block_swap,
        checkpointing=config.gradient_checkpointing,
        optimizer=run.record.facts["optimizer"],
        device=run.accelerator.device,
    )


def _probe_key(pipe: Any, conditioning: Any, batch: int, resolution: int) -> tuple:
    """What the conditioning's probe reads besides the denoiser: its kind and text length (`cache_tag`),
    the batch and size, the autoencoder's scale and channels, the first tokenizer's length."""
    vae = getattr(pipe, "vae", None)
    tokenizer = getattr(pipe, "tokenizer", None)
    return (
        type(conditioning).__qualname__,
        conditioning.cache_tag,
        batch,
        resolution,
        getattr(pipe, "vae_scale_factor", None),
        getattr(getattr(vae, "config", None), "latent_channels", None),
        getattr(tokenizer, "model_max_length", None),
    )
