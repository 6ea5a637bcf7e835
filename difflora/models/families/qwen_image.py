"""Qwen-Image (Alibaba Qwen): a 20 B rectified-flow MMDiT of 60 dual-stream blocks (image and text apart, joint
attention, per-stream modulation and MLP) over 2x2-packed latents of a 16-channel causal video autoencoder
(Wan 2.1's, one frame); Qwen2.5-VL 7B's last hidden states condition it, read through a chat template whose
34 leading tokens are dropped, with the text's attention mask passed on.

Shared machinery: the flow-matching objective is `flow.py` with the pipeline's resolution-dependent
(dynamic, exponential) shift as the default sampling, exactly the μ `QwenImagePipeline` computes from its
scheduler (base 256 tokens -> 0.5, 8192 -> 0.9); the latent packing is the pipeline's own static methods.

File layouts: the transformer's single file (Comfy-Org's `qwen_image_bf16.safetensors`, with or without
ComfyUI's `model.diffusion_model.` prefix) is in diffusers' own module layout, as are every LoRA's names:
ComfyUI maps `lora_unet_<path with _>`, `diffusion_model.<path>`, `transformer.<path>` and `<path>` onto
the same modules (comfy/lora.py), so kohya/musubi-tuner files are diffusers paths flattened.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from difflora.models.families.base import ModelFamily
from difflora.models.families.conditioning import TextConditioning, checked_text_length
from difflora.models.families.flow import FlowSchedule, TimestepSampling

if TYPE_CHECKING:
    import torch

# Joint attention of both streams: q/k/v/out of the image stream and of the text stream (the same names as
# SD3's; Qwen-Image's q/k RMS norms are not Linear layers).
QWEN_ATTENTION: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
QWEN_MLP: tuple[str, ...] = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
# QwenImagePipeline's prompt template and the template tokens dropped from the encoder's output (34: the system
# turn and "<|im_start|>user\n"; `tests/test_qwen_image_tokenizer.py` counts them with the shipped tokenizer).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
TOKENIZER_MAX = 1024  # the pipeline's tokenizer_max_length: caption tokens read after the template
TEXT_TOKENS = 512  # the pipeline's default max_sequence_length: the embeddings' length after the template
PREFIX = "model.diffusion_model."
REQUIRED = ("img_in.weight", "txt_in.weight", "txt_norm.weight", "proj_out.weight", "norm_out.linear.weight")


class QwenImage(ModelFamily):
    name = "qwen-image"
    label = "Qwen-Image"
    # ---- model side
    components = ("transformer", "text_encoder")
    denoiser = "transformer"
    text_encoders = ("text_encoder",)
    pipeline_class_name = "QwenImagePipeline"
    pipeline_has_safety_checker = False
    config_folder = "qwen-image"
    checkpoint_layout = "qwen-image"
    checkpoint_encoder_names = ("Qwen2.5-VL 7B",)
    default_prediction_type = "flow_matching"
    native_resolution = 1024  # the pipeline's default (128 latent pixels); the model card also lists 1328
    default_unet_targets = QWEN_ATTENTION
    mlp_targets = QWEN_MLP
    # --train-text-encoder: none; the 7 B vision-language model stays frozen and cached, as every trainer does.
    trainable_text_encoders = ()
    default_learning_rate = 1e-4
    block_lists: ClassVar[dict[str, str]] = {"joint": "transformer_blocks"}
    edge_blocks: ClassVar[dict[str, str]] = {
        "img_in": "IN",
        "txt_in": "IN",
        "txt_norm": "IN",
        "time_text_embed": "IN",
        "norm_out": "OUT",
        "proj_out": "OUT",
    }
    swappable_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    # ComfyUI's all-in-one layout: the text encoder under `text_encoders.qwen25_7b.transformer.`, the VAE under
    # `vae.` (comfy/supported_models.py); as files of their own they are `--text-encoder` and `--vae`.
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "text_encoder": ("text_encoders.qwen25_7b.transformer.",),
        "vae": ("vae.",),
    }
    part_options: ClassVar[dict[str, str]] = {"text_encoder": "text_encoder", "vae": "vae"}
    single_file_encoders: ClassVar[dict[str, str]] = {"text_encoder": "qwen2.5-vl"}
    single_file_vae = "wan"

    def matches_model(self, unet: Mapping[str, Any], *, embedded: bool) -> bool:
        """A QwenImageTransformer2DModel config (any width or depth): its 3-axis rotary table and no single
        blocks (Flux has both `axes_dims_rope` and `num_single_layers`)."""
        return "axes_dims_rope" in unet and "num_single_layers" not in unet and "in_channels" in unet

    def matches_transformer_file(self, keys: Collection[str]) -> bool:
        """ComfyUI's detection: a `txt_norm` (the RMS norm before the text projection), prefixed or not."""
        return any(key in ("txt_norm.weight", PREFIX + "txt_norm.weight") for key in keys)

    def matches_transformer_keys(self, keys: Collection[str]) -> bool:
        return True  # one variant

    def missing_transformer_keys(self, keys: Collection[str]) -> list[str]:
        stripped = {key[len(PREFIX) :] if key.startswith(PREFIX) else key for key in keys}
        return [key for key in REQUIRED if key not in stripped]

    def build_transformer(self, state: Mapping[str, Any], shipped: Mapping[str, Any], dtype: Any) -> Any:
        from difflora.models.qwen_files import build_transformer

        return build_transformer(state, shipped, dtype)

    def conditioning(
        self, unet: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> TextConditioning:
        return QwenConditioning(int((options or {}).get("max_sequence_length", TEXT_TOKENS)))

    def generation_defaults(self, pipe: Any) -> dict[str, Any]:
        """QwenImagePipeline's defaults: true CFG at 4.0 (it runs with a negative prompt only) and 512 text
        tokens after the template."""
        return {"true_cfg": 4.0, "max_sequence_length": TEXT_TOKENS}

    def pipeline_arguments(
        self, options: Mapping[str, Any], *, negative_prompt: str, images: int
    ) -> dict[str, Any]:
        tokens = checked_text_length(options, TOKENIZER_MAX, "Qwen-Image")
        scale = float(options["true_cfg"])
        arguments: dict[str, Any] = {"true_cfg_scale": scale, "max_sequence_length": tokens}
        if scale > 1 and not negative_prompt:  # the pipeline runs true CFG only with a negative prompt
            arguments["negative_prompt"] = (
                " " if images == 1 else [" "] * images
            )  # Qwen-Image's examples' " "
        return arguments

    def prompt_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The pipeline's own `encode_prompt` (template, dropped prefix, mask), the negative's where true CFG
        is on: the pipeline runs it only when given, and then an empty negative stands for none."""
        tokens = int(options["max_sequence_length"])
        device = pipe._execution_device
        positive, mask = pipe.encode_prompt(prompt, device, max_sequence_length=tokens)
        found = {"prompt_embeds": positive, "prompt_embeds_mask": mask}
        if float(options["true_cfg"]) > 1:
            negative, negative_mask = pipe.encode_prompt(
                negative_prompt or " ", device, max_sequence_length=tokens
            )
            found |= {"negative_prompt_embeds": negative, "negative_prompt_embeds_mask": negative_mask}
        return found

    def latent_encoder(self, vae: Any) -> Any:
        return FrameLatents(vae)

    def own_tokenizer(self, name: str) -> Any | None:
        """Qwen2.5-VL's byte-level BPE, shipped in tokenizer/ (`scripts/build_qwen_tokenizer.py`)."""
        if name != "tokenizer":
            return None
        from transformers import Qwen2Tokenizer

        folder = self.config_dir()
        assert folder is not None
        return Qwen2Tokenizer.from_pretrained(str(folder / name), local_files_only=True)

    def prediction_type_of(self, scheduler_config: Mapping[str, Any]) -> str:
        return self.default_prediction_type

    def native_pixels(self, pipe: Any) -> int:
        """QwenImagePipeline's own default: 128 latent pixels of the 8x autoencoder."""
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def vae_factor(self, vae_config: Mapping[str, Any]) -> int:
        """The pipeline's: 2 per temporal-downsampling level of the causal autoencoder (8)."""
        return int(2 ** len(vae_config["temperal_downsample"]))

    def denoiser_downsamplings(self, denoiser_config: Mapping[str, Any]) -> int:
        """Once: 2x2 latent pixels are packed into one token."""
        return 1

    def flow_schedule(self, scheduler_config: Mapping[str, Any], sampling: Any) -> FlowSchedule:
        """The pipeline's dynamic shift (`flux-shift` over the scheduler's own line) unless told otherwise."""
        return FlowSchedule.from_scheduler(scheduler_config, sampling or TimestepSampling("flux-shift"))

    # ---- file layouts
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {}
    kohya_denoiser_aliases = ("lora_transformer",)  # OneTrainer's: diffusers paths flattened
    kohya_base_version = "qwen_image"
    kohya_network_module = "networks.lora_qwen_image"
    modelspec_states_prediction = False
    kohya_version_prefixes = ("qwen_image", "qwen-image")
    modelspec_architecture = "qwen-image/lora"
    modelspec_prefixes = ("qwen-image",)
    modelspec_implementation = "https://github.com/QwenLM/Qwen-Image"
    consumers = ("comfyui", "diffusers")
    # QwenImageLoraLoaderMixin converts `lora_unet_` / `diffusion_model.` names back to diffusers paths
    # (`_convert_non_diffusers_qwen_lora_to_diffusers`), every Linear of the transformer.
    diffusers_converts_kohya = True


class FrameLatents:
    """Qwen-Image's video autoencoder as training encodes images with it: each image one frame ([B, 3, 1, H,
    W] in), the latents of that frame normalised per channel, (x - mean_c) / std_c, which is exactly what
    `QwenImagePipeline` undoes before decoding (x / (1 / std_c) + mean_c); hence scaling 1 and no shift. The
    posterior stays Gaussian under that affine map: mean' = (mean - mean_c) / std_c, std' = std / std_c."""

    def __init__(self, vae: Any) -> None:
        from diffusers.configuration_utils import FrozenDict

        self.vae = vae
        self.config = FrozenDict(scaling_factor=1.0, shift_factor=0.0)

    @property
    def dtype(self) -> Any:
        return self.vae.dtype

    def parameters(self) -> Any:
        return self.vae.parameters()

    def encode(self, pixels: torch.Tensor) -> Any:
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        posterior = self.vae.encode(pixels[:, :, None]).latent_dist
        shape = (1, int(self.vae.config.z_dim), 1, 1)
        mean_c = torch.tensor(self.vae.config.latents_mean).view(shape).to(posterior.mean)
        std_c = torch.tensor(self.vae.config.latents_std).view(shape).to(posterior.mean)
        mean = (posterior.mean[:, :, 0] - mean_c) / std_c
        logvar = posterior.logvar[:, :, 0] - 2 * torch.log(std_c)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)))


class QwenConditioning(TextConditioning):
    """`QwenImagePipeline._get_qwen_prompt_embeds` restated for the text cache: each caption in the prompt
    template, Qwen2.5-VL's last hidden state over its real tokens, the template's first 34 dropped, then cut
    to `text_tokens` and zero-padded to that length with a mask saying which tokens are real (the pipeline
    pads to the longest caption of a call; the transformer masks the padding either way, so the fixed length
    changes nothing but lets cached captions stack)."""

    def __init__(self, text_tokens: int = TEXT_TOKENS) -> None:
        self.text_tokens = text_tokens

    @property
    def cache_tag(self) -> str:
        return f"qwen={self.text_tokens}"

    def encode(
        self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], captions: list[str]
    ) -> dict[str, torch.Tensor]:
        """captions -> {"hidden": [B, text tokens, width], "mask": [B, text tokens] (1: a real token)}."""
        import torch

        encoder = encoders[0]
        device = next(encoder.parameters()).device
        tokens = tokenizers[0](
            [PROMPT_TEMPLATE.format(caption) for caption in captions],
            max_length=TOKENIZER_MAX + TEMPLATE_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        output = encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        )
        states = output.hidden_states[-1]
        hidden = states.new_zeros(len(captions), self.text_tokens, states.shape[-1])
        mask = torch.zeros(len(captions), self.text_tokens, dtype=torch.long, device=device)
        for row, (state, real) in enumerate(zip(states, tokens.attention_mask.bool(), strict=True)):
            kept = state[real][TEMPLATE_TOKENS:][: self.text_tokens]
            hidden[row, : len(kept)] = kept
            mask[row, : len(kept)] = 1
        return {"hidden": hidden, "mask": mask}

    def predict(
        self,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        device: torch.device,
        dtype: torch.dtype,
        guidance: float,
    ) -> torch.Tensor:
        """The velocity for latents [B, C, H, W] at σ (the transformer takes σ, as the pipeline's t/1000);
        `guidance` is unused (Qwen-Image is not guidance-distilled)."""
        from diffusers import QwenImagePipeline

        size, channels, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy.to(device, dtype), size, channels, height, width)
        output = model(
            hidden_states=packed,
            timestep=timesteps.to(device, dtype),
            encoder_hidden_states=text["hidden"].to(device, dtype),
            encoder_hidden_states_mask=text["mask"].to(device).long(),
            img_shapes=[[(1, height // 2, width // 2)]] * size,
            return_dict=False,
        )[0]
        return QwenImagePipeline._unpack_latents(output, height, width, 1)[:, :, 0]  # one frame

    def probe(self, pipe: Any, model: torch.nn.Module, batch: int, resolution: int) -> Callable[[], Any]:
        import torch

        parameter = next(model.parameters())
        side = 2 * (resolution // (2 * int(pipe.vae_scale_factor)))
        config = model.config
        latents = torch.randn(batch, int(config.in_channels) // 4, side, side)
        text = {
            "hidden": torch.randn(batch, self.text_tokens, int(config.joint_attention_dim)),
            "mask": torch.ones(batch, self.text_tokens, dtype=torch.long),
        }
        sigmas = torch.full((batch,), 0.5)
        device, dtype = parameter.device, parameter.dtype
        return lambda: self.predict(
            model, latents, sigmas, text, {}, device=device, dtype=dtype, guidance=1.0
        )
