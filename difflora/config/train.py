"""TrainConfig: every knob of `difflora train`, one field each; the string under a field is its flag's help.

Flag and TOML key names map 1:1 (`--learning-rate` <-> `learning_rate`). Fields whose default is None are
derived from the data or the model when the run starts (steps, resolution, alpha, warm-up, save cadence,
sample prompts), and the plan printed before training says what they became and why: there is no hidden
fixed default. The defaults make `difflora train sample_data/style` produce a visibly working adapter on
the embedded model in a few minutes on two CPU cores (measured runs in BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

from difflora.adapter.spec import TEXT_ENCODER_TARGETS, LoraSpec
from difflora.config import Problems, coerce_to_tuples
from difflora.config.train_blocks import block_filter
from difflora.config.train_checks import (
    check_choices,
    check_counts,
    check_ema,
    check_masks,
    check_prior,
    check_rates,
    check_regularisation,
    check_validation,
)

Precision = Literal["no", "fp16", "bf16"]
Schedule = Literal["constant", "cosine", "linear"]
Optimizer = Literal["auto", "adamw", "adamw8bit", "prodigy", "adamw-schedulefree", "adafactor"]
OPTIMIZER_LEARNING_RATES = {"prodigy": 1.0}  # Prodigy estimates its own step size: its authors' lr is 1
PredictionChoice = Literal["epsilon", "v_prediction"]
Quantization = Literal["int8", "nf4", "fp8"]  # difflora.models.quantize: bitsandbytes' LLM.int8 and NF4


class FamilyDefaults(Protocol):
    """What a run's defaults read from the model's family (a `difflora.models.families.ModelFamily`; named
    structurally so that config/ imports nothing above it)."""

    @property
    def default_learning_rate(self) -> float: ...

    @property
    def default_unet_targets(self) -> tuple[str, ...]: ...

    def target_preset(self, name: str) -> tuple[str, ...]: ...

    @property
    def block_lists(self) -> dict[str, str]: ...

    @property
    def label(self) -> str: ...


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = ""
    """Folder of images with same-name .txt/.caption captions (kohya `N_name/` subfolders give N repeats)."""

    # ---------------------------------------------------------------- output
    name: str | None = None
    """Adapter name: writes <output-dir>/<name>.safetensors. Default: the data folder's name."""
    output_dir: str = "adapters"
    """Where the adapter goes; checkpoints, logs and samples go in <output-dir>/<name>.run/ beside it."""

    # ---------------------------------------------------------------- model and LoRA
    model: str | None = None
    """Base model: a diffusers folder, a .safetensors checkpoint or a hub id. Default: the embedded tiny model."""
    clip_l: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its CLIP-L text encoder (ComfyUI's clip_l.safetensors)."""
    t5: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its T5-XXL encoder (t5xxl_fp16.safetensors)."""
    vae: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its autoencoder (BFL's ae.safetensors)."""
    clip_g: str | None = None
    """With a transformer-only SD3 / SD3.5 file as --model: its CLIP-G encoder (ComfyUI's clip_g.safetensors)."""
    text_encoder: str | None = None
    """With a Qwen-Image transformer file as --model: its Qwen2.5-VL text encoder (ComfyUI's
    qwen_2.5_vl_7b.safetensors)."""
    prediction_type: PredictionChoice | None = None
    """What the base's UNet predicts: epsilon or v_prediction. Default: the model's own (its scheduler
    config, or for a single file the v_pred key / ModelSpec metadata, else v-prediction for SD 2.x).
    Pass epsilon for an SD 2.x 512-px base checkpoint."""
    rank: int = 8
    """LoRA rank (inner dimension of each adapter)."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha/rank. Default: equal to --rank (scale 1)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input during training."""
    rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale updates by alpha/sqrt(rank) instead of alpha/rank,
    so higher ranks keep learning. The file stores alpha·sqrt(rank), so every consumer applies the same update."""
    loraplus_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024): train B at this many times A's learning rate (the paper uses 16); 1 is plain LoRA."""
    algo: Literal["lora", "lokr", "loha"] = "lora"
    """The adapter kind: lora, or the LyCORIS kinds lokr (Kronecker product) and loha (Hadamard product),
    trained through peft and saved in LyCORIS keys, which ComfyUI, A1111 and difflora compose."""
    factor: int = -1
    """With --algo lokr: the Kronecker factor (LyCORIS's and peft's decompose factor); -1 splits each
    dimension as evenly as it can."""
    dora: bool = False
    """DoRA (Liu et al. 2024, peft's use_dora): also train a magnitude per output row of every adapted weight,
    which is re-normalised around the LoRA direction. Not additive: composed with other adapters it is applied
    as its effective update against the base; the ComfyUI/A1111 export converts it (see the README)."""
    conv_rank: int | None = None
    """LoCon: also adapt the UNet ResNets' 3x3 convolutions, at this rank (kohya's --conv_dim). Default: off
    (on the embedded tiny model its default targets already include them at --rank)."""
    conv_alpha: float | None = None
    """Alpha of the LoCon convolutions (kohya's --conv_alpha). Default: equal to --conv-rank."""
    adaptive_rank: bool = False
    """AdaLoRA (Zhang et al. 2023, through peft): start every module at --adaptive-init-rank and prune the
    least important rank components while training until the modules average --rank; the adapter is an
    ordinary LoRA with each module's own final rank. Updates keep the scale alpha/rank."""
    adaptive_init_rank: int | None = None
    """Rank every module starts at with --adaptive-rank. Default: 1.5 x --rank, rounded up."""
    adaptive_warmup: float | None = None
    """With --adaptive-rank: the fraction of the steps trained at the initial rank before pruning starts
    (AdaLoRA's tinit). Default: 0.1."""
    adaptive_final: float | None = None
    """With --adaptive-rank: the fraction of the steps at the end trained with the final ranks fixed
    (AdaLoRA's tfinal). Default: 0.2."""
    adaptive_interval: float | None = None
    """With --adaptive-rank: prune every this fraction of the steps, at least every step (AdaLoRA's
    deltaT). Default: 0.01."""
    adaptive_orth_reg: float | None = None
    """With --adaptive-rank: weight of the orthogonality penalty on the singular vectors added to the loss
    (AdaLoRA's orth_reg_weight). Default: 0.5 (peft's)."""
    quantize_base: Quantization | None = None
    """Hold the frozen base's Linear layers quantized while the LoRA weights train in float32 (QLoRA):
    int8 (LLM.int8) or nf4 (4-bit NormalFloat), through bitsandbytes on the CPU or CUDA (pip install
    'difflora[quantize]'), or fp8 (float8_e4m3fn storage upcast per layer, no extra package). Less memory
    for the base; the adapter is an ordinary one for the unquantized base. Default: off."""
    targets: str | None = None
    """LoRA targets of the denoiser by preset, as its family declares them: attention (the default),
    attention-mlp (adds the feed-forward layers) or all-linear (every Linear). --unet-targets overrides it."""
    blocks: tuple[str, ...] = ()
    """Limit the LoRA to some transformer blocks, KIND=RANGES per kind (Flux: double=0-18, single=0-37,
    e.g. --blocks double=7-12 --blocks single=0,5-9); kinds not named keep every block. Default: all blocks."""
    unet_targets: tuple[str, ...] | None = None
    """UNet module names that get LoRA layers (suffixes of module paths). Default: the attention projections
    (to_q, to_k, to_v, to_out.0); on the embedded tiny model also its ResNet convs, proj_in/out and
    feed-forward layers, without which it cannot learn a new shape (see difflora.models.families.tiny)."""
    train_text_encoder: bool = False
    """Also train LoRA layers on the text encoder(s) (disables the text-embedding cache). Flux.1: CLIP-L only,
    T5-XXL stays frozen."""
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    """Text-encoder module names that get LoRA layers with --train-text-encoder."""
    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder LoRA. Default: --learning-rate."""
    text_encoder_2_lr: float | None = None
    """Learning rate of the LoRA on SDXL's second text encoder (OpenCLIP ViT-bigG). Default: --text-encoder-lr."""

    # ---------------------------------------------------------------- data
    resolution: int | None = None
    """Training resolution in pixels (buckets hold about resolution² pixels). Default: the model's native size."""
    trigger: str | None = None
    """Trigger word put first in every caption (and used as the caption of images that have none)."""
    caption_extension: str = ".txt"
    """Caption file extension looked for first (.txt or .caption; the other is also read)."""
    caption_dropout: float = 0.0
    """Probability of training a draw with an empty caption (helps classifier-free guidance)."""
    shuffle_tags: bool = False
    """Shuffle comma-separated tags after the first --keep-tokens (disables the text-embedding cache)."""
    keep_tokens: int = 0
    """Tags kept in place at the start of the caption when shuffling or dropping tags."""
    tag_dropout: float = 0.0
    """Probability of dropping each tag after the kept ones (disables the text-embedding cache)."""
    flip: bool = False
    """Mirror images horizontally at random (both orientations are cached)."""
    random_crop: bool = False
    """Crop at a random position instead of the centre (one window per image when latents are cached)."""
    no_upscale: bool = False
    """Never enlarge small images: they get a bucket of their own size."""
    masks: str | None = None
    """Folder of loss masks: a grayscale image per training image, same file name (white learns, black
    does not), so the adapter learns the subject and not the background."""
    alpha_mask: bool = False
    """Use each image's own alpha channel as its loss mask (opaque learns, transparent does not)."""
    unmasked_weight: float = 0.0
    """How much the masked-out (black) pixels still count in the loss, from 0 (nothing) to 1 (no mask)."""
    preserve_base: bool = False
    """Keep the base model's other knowledge: on the same batch with the trigger word removed (or on
    --preserve-prompts), train the adapted prediction towards the base's own (one extra forward per step)."""
    preserve_prompts: str | None = None
    """A text file of trigger-free prompts, one per line, for --preserve-base instead of the captions."""
    prior_weight: float = 1.0
    """Weight of the prior loss beside the training loss: --preserve-base's, or that of --reg-dir's class
    images (0: only measure the drift)."""
    cache_latents: bool = True
    """Encode every image with the VAE once and reuse the latents (on disk, reused across runs)."""
    cache_dir: str | None = None
    """Where latent and text-embedding caches live. Default: <output-dir>/.cache."""

    # ---------------------------------------------------------------- length and optimisation
    max_steps: int | None = None
    """Optimizer steps to train. Default: derived from the data (10 epochs, at least 300 and at most 2000 steps)."""
    epochs: int | None = None
    """Passes over the data (instead of --max-steps)."""
    batch_size: int = 4
    """Images per batch (per process)."""
    gradient_accumulation: int = 1
    """Batches accumulated per optimizer step."""
    learning_rate: float | None = None
    """Learning rate of the UNet LoRA. Default: 4e-3 on the embedded tiny model (it learns in ~100 CPU
    steps), 1e-4 on full-size models."""
    lr_scheduler: Schedule = "cosine"
    """Learning-rate schedule after warm-up: constant, cosine or linear (decay to 0)."""
    lr_warmup_steps: int | None = None
    """Steps of linear learning-rate warm-up. Default: 5% of the steps."""
    optimizer: Optimizer = "auto"
    """adamw, adamw8bit (needs bitsandbytes: on CUDA, or on the CPU with bitsandbytes >= 0.50), auto (8-bit
    on CUDA when bitsandbytes is installed, else adamw), prodigy (estimates its step size; default lr 1),
    adamw-schedulefree (no schedule; samples and saves use its evaluation weights) or adafactor. prodigy and
    adamw-schedulefree: pip install 'difflora[optimizers]'."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0 disables clipping)."""
    mixed_precision: Precision = "no"
    """no, fp16 (CUDA only) or bf16: frozen weights in that precision, LoRA weights in float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, slower steps."""
    blocks_to_swap: int = 0
    """CUDA only: keep the frozen weights of the denoiser's last N transformer blocks (Flux: double then
    single blocks) in CPU memory and copy each onto the GPU for its forward and backward, overlapped with
    compute (kohya's option): less GPU memory, slower steps. 0: off."""
    compile: bool = False
    """Compile the trained models with torch.compile (inductor; on CPU it needs a C++ compiler): a one-time
    compile of a minute or more for faster steps on long runs (see BENCHMARKS.md for when it pays)."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero signal at the last timestep (Lin et al. 2023), so the model learns
    to start from pure noise; needs a v-prediction base (SD 2.x 768-v). Images generated with the adapter
    use the rescaled schedule too."""
    timestep_sampling: str | None = None
    """Flow-matching models (Flux.1): where σ is drawn: uniform, sigmoid (sigmoid of --timestep-scale·N(0,1)),
    logit-normal (of --timestep-mean + --timestep-scale·N(0,1)), shift (sigmoid shifted by --timestep-shift)
    or flux-shift (shifted by the image's token count, as Flux samples). Default: flux-shift for dev, sigmoid
    for schnell."""
    timestep_mean: float = 0.0
    """Mean of logit-normal timestep sampling."""
    timestep_scale: float = 1.0
    """Scale of the normal behind sigmoid, logit-normal, shift and flux-shift sampling."""
    timestep_shift: float = 3.0
    """The constant shift of --timestep-sampling shift (SD3's 3.0)."""
    guidance: float = 1.0
    """Guidance-distilled models (Flux.1 dev): the guidance scale fed to the transformer while training."""
    noise_offset: float = 0.0
    """Add this much per-channel offset noise (helps very dark/bright images; 0.05-0.1 typical)."""
    min_snr_gamma: float = 5.0
    """Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables it."""
    seed: int = 0
    """Seed for LoRA initialisation, data order, noise and timesteps."""
    num_threads: int | None = None
    """CPU threads for torch. Default: measured at start: all cores (shared among processes) or 1, whichever
    runs the UNet faster (on a busy machine one thread can be many times faster)."""

    # ---------------------------------------------------------------- checkpoints, samples, guard
    save_every: int | None = None
    """Save a checkpoint every N steps (0: only at the end). Default: a quarter of the run."""
    keep_checkpoints: int = 3
    """How many of the most recent checkpoints to keep."""
    resume: bool = False
    """Continue from the last checkpoint in the run directory (optimizer, schedule, RNG, data position)."""
    sample_every: int | None = None
    """Render the sample grid every N steps (0: never). Default: half-way and at the end (each grid of the
    default run costs as much as ~20 training steps on a CPU; two keep previews under a tenth of the run)."""
    sample_prompts: tuple[str, ...] = ()
    """Prompts of the sample grid. Default: up to 3 distinct captions of the data set."""
    sample_seeds: tuple[int, ...] = (1, 2)
    """Seeds of the sample grid (one column each)."""
    sample_steps: int = 12
    """Denoising steps per sample image (a preview: measured at ~0.55x the time of 20 steps)."""
    sample_guidance: float = 5.0
    """Classifier-free guidance scale of the samples."""
    sample_scheduler: str = "euler"
    """Scheduler of the samples (the same names as `difflora generate --scheduler`)."""
    grad_log_every: int = 10
    """Record every LoRA layer's A and B gradient norms every N steps (gradients.csv, gradients.png,
    TensorBoard) and warn about layers whose gradients vanish or explode; 0 turns it off."""
    quiet_advice: bool = False
    """Leave out the advice lines: the plan's notes on an unusual rank, alpha or learning rate, and what to do
    about layers whose gradients vanish or explode (the warnings themselves stay)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each such step is skipped)."""

    # ---------------------------------------------------------------- validation
    validation_split: float = 0.0
    """Hold out this share of the images (at least one, chosen from --seed, listed in the plan) and measure
    the loss on them at each checkpoint: at fixed timesteps and fixed noise, so the curve follows the adapter."""
    validation_dir: str | None = None
    """A folder of held-out images and captions to measure the validation loss on (instead of a split)."""
    validate_every: int = 0
    """Also measure the validation loss every N steps (0: at each checkpoint only)."""
    keep_best: bool = False
    """Also write the adapter of the checkpoint with the lowest validation loss, as <name>.best.safetensors."""
    ema: float = 0.0
    """Keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999; 0: off), written as
    <name>.ema.safetensors with its own sample grid and validation loss."""
    ema_on_cpu: bool = False
    """Keep the --ema average in CPU memory (float32) instead of beside the model."""

    # ---------------------------------------------------------------- regularisation images
    reg_dir: str | None = None
    """A folder of class images with their captions (DreamBooth's regularisation images), drawn as often as
    the training images and weighted by --prior-weight, so the class keeps what the base knows of it."""

    def __post_init__(self) -> None:
        coerce_to_tuples(self, "unet_targets", "text_encoder_targets", "sample_prompts", "blocks")
        object.__setattr__(self, "sample_seeds", tuple(int(s) for s in self.sample_seeds))
        problems = Problems()
        problems.check(bool(self.data_dir), "data_dir", "give the folder of training images")
        check_counts(self, problems)
        check_rates(self, problems)
        check_choices(self, problems)
        check_validation(self, problems)
        check_ema(self, problems)
        check_masks(self, problems)
        check_prior(self, problems)
        check_regularisation(self, problems)
        problems.raise_if_any("train")

    # Derived values: the plan prints these next to the rule that produced them.
    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def effective_adaptive_init_rank(self) -> int:
        """--adaptive-init-rank, else 1.5 x --rank rounded up (peft's defaults are 12 for a target of 8)."""
        if self.adaptive_init_rank is not None:
            return self.adaptive_init_rank
        return math.ceil(1.5 * self.rank)

    @property
    def adaptive_fractions(self) -> tuple[float, float, float]:
        """(warm-up, final, interval) fractions of the run for --adaptive-rank, defaults filled in."""
        return (
            self.adaptive_warmup if self.adaptive_warmup is not None else 0.1,
            self.adaptive_final if self.adaptive_final is not None else 0.2,
            self.adaptive_interval if self.adaptive_interval is not None else 0.01,
        )

    @property
    def effective_adaptive_orth_reg(self) -> float:
        return self.adaptive_orth_reg if self.adaptive_orth_reg is not None else 0.5

    def effective_learning_rate(self, family: FamilyDefaults) -> float:
        """--learning-rate, else the default for the model family (see the field's help)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return OPTIMIZER_LEARNING_RATES.get(self.optimizer, family.default_learning_rate)

    def effective_unet_targets(self, family: FamilyDefaults) -> tuple[str, ...]:
        """--unet-targets, else the family's (the attention projections, more on the embedded model)."""
        if self.unet_targets is not None:
            return self.unet_targets
        if self.targets is not None:
            return family.target_preset(self.targets)
        return family.default_unet_targets

    def lora_spec(self, family: FamilyDefaults) -> LoraSpec:
        """The LoRA layers this run adds to a model of `family` (whose default targets fill the gaps)."""
        return LoraSpec(
            rank=self.rank,
            alpha=self.effective_alpha,
            dropout=self.lora_dropout,
            unet_targets=self.effective_unet_targets(family),
            text_encoder_targets=self.text_encoder_targets,
            rslora=self.rslora,
            dora=self.dora,
            algo=self.algo,
            factor=self.factor,
            conv_rank=self.conv_rank,
            conv_alpha=self.conv_alpha,
            adaptive_init_rank=self.effective_adaptive_init_rank if self.adaptive_rank else None,
            blocks=block_filter(self.blocks, family.block_lists),
        )

    def effective_text_encoder_lr(self, family: FamilyDefaults, component: str = "text_encoder") -> float:
        """The text encoder's rate: --text-encoder-lr (--text-encoder-2-lr for SDXL's second encoder, which
        falls back to the first's), else --learning-rate's."""
        if component == "text_encoder_2" and self.text_encoder_2_lr is not None:
            return self.text_encoder_2_lr
        if self.text_encoder_lr is not None:
            return self.text_encoder_lr
        return self.effective_learning_rate(family)
