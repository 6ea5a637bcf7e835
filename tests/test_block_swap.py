"""--blocks-to-swap's mechanics on the CPU: the tiny Flux with its last blocks swapped (onload device = the CPU,
so a resident block is a distinct copy of its weights) computes the same loss and LoRA gradients as
without swapping, moves each block in forward order and back in reverse, keeps at most two resident, and
leaves every frozen weight at home between steps while the LoRA weights never move."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig

from difflora.adapter.spec import LoraSpec
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError
from difflora.models.families import family
from difflora.training.block_swap import BlockSwap, frozen_tensors, swappable_blocks
from difflora.training.setup import load_models
from difflora.training.trainer import train
from tests.support.paths import REPO_ROOT, SAMPLE_DATA

TINY_FLUX = REPO_ROOT / "difflora" / "embedded" / "flux" / "transformer"
SWAPPED = 3  # of the tiny Flux's 2 double + 2 single blocks


def _model(checkpointing: bool) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_pretrained(TINY_FLUX)
    model.requires_grad_(False)
    # random A and B (not peft's zero B): every LoRA gradient is non-zero, so equality means something
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _inputs(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    config = model.config
    return {
        "hidden_states": torch.randn(2, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(2, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.3, 0.7]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


def _step(model: FluxTransformer2DModel, swap: BlockSwap | None) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**_inputs(model), return_dict=False)[0]
    loss = (output.float() ** 2).mean()
    loss.backward()
    if swap is not None:
        swap.finish()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_blocks_give_the_same_loss_and_lora_gradients(checkpointing: bool) -> None:
    plain = _model(checkpointing)
    loss, grads = _step(plain, None)
    model = _model(checkpointing)
    blocks = swappable_blocks(model, family("flux").swappable_blocks)
    assert len(blocks) == 4  # the family's lists: 2 double then 2 single blocks
    lora_before = {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    events: list[tuple[str, int]] = []
    swap = BlockSwap(blocks[-SWAPPED:], torch.device("cpu"), events)
    homes = {id(t): home.data_ptr() for state in swap.blocks for t, home in state.homes}
    at_home_in_forward: list[bool] = []
    for block in blocks[-SWAPPED:]:  # runs after the swap's own pre-hook: the block must be resident
        block.register_forward_pre_hook(
            lambda module, args: at_home_in_forward.extend(
                homes[id(t)] == t.data_ptr() for t in frozen_tensors(module)
            )
        )
    for _ in range(2):  # the second step starts from where the first left every weight
        events.clear()
        swapped_loss, swapped_grads = _step(model, swap)
        assert swapped_loss == loss
        assert swapped_grads.keys() == grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            assert torch.equal(swapped_grads[name], grad), name
            assert grad.abs().sum() > 0, name
        # forward onloads 0, 1, 2 (each prefetched while the previous computes) and drops each after its
        # forward; backward brings them back in reverse; nothing is left resident
        forward = [("on", 0), ("on", 1), ("off", 0), ("on", 2), ("off", 1), ("off", 2)]
        backward = [("on", 2), ("on", 1), ("off", 2), ("on", 0), ("off", 1), ("off", 0)]
        assert events == forward + backward
        assert _max_resident(events) == 2
        assert at_home_in_forward and not any(at_home_in_forward)  # computed on the resident copies
        at_home_in_forward.clear()
        assert swap.resident == []
        for block in blocks[-SWAPPED:]:  # between steps every frozen weight is its CPU home
            assert all(homes[id(t)] == t.data_ptr() for t in frozen_tensors(block))
        for name, parameter in model.named_parameters():  # LoRA: never moved, float32, trainable
            if parameter.requires_grad:
                assert parameter.data_ptr() == lora_before[name] and parameter.dtype == torch.float32


def _max_resident(events: list[tuple[str, int]]) -> int:
    resident: set[int] = set()
    most = 0
    for what, index in events:
        (resident.add if what == "on" else resident.discard)(index)
        most = max(most, len(resident))
    return most


def test_blocks_not_swapped_and_forwards_without_gradient_are_left_alone() -> None:
    model = _model(False)
    blocks = swappable_blocks(model, family("flux").swappable_blocks)
    kept = {id(t): t.data_ptr() for t in frozen_tensors(blocks[0])}
    events: list[tuple[str, int]] = []
    swap = BlockSwap(blocks[-SWAPPED:], torch.device("cpu"), events)
    with torch.no_grad():  # a sample render: each block in and out once, no backward to wait for
        model(**_inputs(model), return_dict=False)
    assert events == [("on", 0), ("on", 1), ("off", 0), ("on", 2), ("off", 1), ("off", 2)]
    assert {id(t): t.data_ptr() for t in frozen_tensors(blocks[0])} == kept
    swap.remove()
    assert all(t.device.type == "cpu" for block in blocks for t in frozen_tensors(block))


def test_training_refuses_block_swap_without_cuda_in_one_line(tmp_path) -> None:
    config = TrainConfig(
        data_dir=str(SAMPLE_DATA / "style"),
        model=str(TINY_FLUX.parent),
        output_dir=str(tmp_path),
        blocks_to_swap=2,
    )
    with pytest.raises(ConfigError) as error:
        train(config, progress=False)
    assert str(error.value) == (
        "--blocks-to-swap needs a CUDA GPU (it moves blocks into GPU memory); leave it out here."
    )
    assert not list(tmp_path.glob("*.safetensors"))


def test_load_models_swaps_the_last_blocks_and_keeps_lora_on_the_device() -> None:
    """The training set-up with an onload device (here the CPU): the family's last N blocks are swapped,
    their LoRA weights float32 and trainable outside the swap; a family without swappable blocks (SD's
    UNet) and N beyond the block count are refused in one line."""
    models = _swap_models(str(TINY_FLUX.parent), 3)
    denoiser = models.pipe.transformer
    blocks = [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]
    assert [state.module for state in models.block_swap.blocks] == blocks[1:]
    swapped = {id(t) for state in models.block_swap.blocks for t, _ in state.homes}
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and id(p) not in swapped for p in trainable)
    assert swapped == {id(t) for block in blocks[1:] for t in frozen_tensors(block)}
    with pytest.raises(
        ConfigError, match=r"^--blocks-to-swap 5: Flux.1 dev has 4 blocks; give at most that.$"
    ):
        _swap_models(str(TINY_FLUX.parent), 5)
    with pytest.raises(ConfigError, match=r"^--blocks-to-swap: .* has no swappable transformer blocks"):
        _swap_models(None, 1)


def _swap_models(model: str | None, count: int):
    return load_models(
        model, device=torch.device("cpu"), mixed_precision="no",
        lora=lambda family: LoraSpec(rank=4, alpha=4, unet_targets=family.default_unet_targets),
        train_text_encoder=False, gradient_checkpointing=False, seed=0, blocks_to_swap=count,
    )  # fmt: skip
