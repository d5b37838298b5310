"""The fast path (loading=batch: cached uint8 batches augmented on the device) against the plain path
(loading=sample: per-image DataLoader transforms): same batches, same evaluation, augmentations that do what
they say, and rank shards that add up to the single-process batches."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import train
from custom_dataset_dataloader import BatchAugmentation, BatchLoader, build_dataloader
from model import build_model, resolve_preprocessing

NO_AUGMENTATION = {"flip": False, "rotation_degrees": 0.0, "translate_fraction": 0.0, "scale_jitter": 0.0,
                   "color_jitter": 0.0}


def _epoch(loader, epoch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return [(images, ages) for images, ages, _, _ in loader]


def test_batch_and_sample_paths_give_the_same_batches(split_config):
    cfg = replace(split_config, **NO_AUGMENTATION)
    fast, plain = build_dataloader(cfg, "train"), build_dataloader(replace(cfg, loading="sample"), "train")
    assert isinstance(fast, BatchLoader) and not isinstance(plain, BatchLoader)
    assert len(fast) == len(plain) > 1
    for (fast_images, fast_ages), (plain_images, plain_ages) in zip(_epoch(fast), _epoch(plain), strict=True):
        assert fast_images.shape == plain_images.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
        assert fast_images.dtype == torch.float32
        torch.testing.assert_close(fast_images, plain_images, atol=1e-6, rtol=0)
        assert torch.equal(fast_ages, plain_ages)
    assert not torch.equal(_epoch(fast, 1)[0][1], _epoch(fast, 2)[0][1])  # set_epoch reshuffles


def test_batch_and_sample_paths_evaluate_alike(split_config):
    model = build_model(split_config)
    model.eval()
    device = torch.device("cpu")
    fast = train.evaluate(model, build_dataloader(split_config, "test"), train.Execution(device), keep_outputs=True)
    plain = train.evaluate(model, build_dataloader(replace(split_config, loading="sample"), "test"),
                           train.Execution(device), keep_outputs=True)
    assert fast["targets"] == plain["targets"]
    np.testing.assert_allclose(fast["predictions"], plain["predictions"], atol=1e-4)
    torch.testing.assert_close(fast["outputs"], plain["outputs"], atol=1e-4, rtol=0)


def test_batch_loader_reads_the_memory_map_without_copying_it(split_config):
    loader = build_dataloader(split_config, "train")
    next(iter(loader))
    assert isinstance(loader._array, np.memmap)  # on the CPU only the batch is read
    assert loader._resident is None


def _gradient_images(count: int = 64, size: int = 32) -> torch.Tensor:
    """uint8 (count, 3, size, size): a horizontal ramp in red, so a mirror image is easy to tell apart."""
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    images = torch.zeros(count, 3, size, size, dtype=torch.uint8)
    images[:, 0] = ramp
    images[:, 1] = 128
    return images


def _normalise(cfg, pixels: torch.Tensor) -> torch.Tensor:
    return BatchAugmentation(cfg, train=False)(pixels)


def test_evaluation_transform_only_normalises(split_config):
    split_config = resolve_preprocessing(split_config)  # the backbone's mean and std, as the loaders use them
    pixels = _gradient_images()
    expected = (pixels.float() / 255 - torch.tensor(split_config.normalize_mean).view(1, 3, 1, 1)) / torch.tensor(
        split_config.normalize_std).view(1, 3, 1, 1)
    torch.testing.assert_close(_normalise(split_config, pixels), expected)


def test_flip_mirrors_about_half_of_the_images(split_config):
    cfg = replace(split_config, **{**NO_AUGMENTATION, "flip": True})
    pixels = _gradient_images()
    torch.manual_seed(0)
    output = BatchAugmentation(cfg, train=True)(pixels)
    same = (output - _normalise(cfg, pixels)).abs().amax((1, 2, 3)) < 1e-6
    mirrored = (output - _normalise(cfg, pixels.flip(-1))).abs().amax((1, 2, 3)) < 1e-6
    assert torch.all(same ^ mirrored)  # every image is exactly one of the two
    assert 16 < mirrored.sum() < 48


def test_affine_jitter_moves_the_face_a_little_and_fills_with_black(split_config):
    cfg = replace(split_config, **{**NO_AUGMENTATION, "rotation_degrees": 10.0, "translate_fraction": 0.04,
                                   "scale_jitter": 0.07})
    pixels = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    output = BatchAugmentation(cfg, train=True)(pixels)
    white = _normalise(cfg, pixels)
    inner = (output - white)[:, :, 8:24, 8:24].abs().amax()
    assert inner < 1e-4  # the middle of the face stays where it was
    changed = (output - white).abs().amax((1, 2, 3)) > 0.1
    assert changed.float().mean() > 0.5  # most images had a border pixel rotated or shifted in from outside
    torch.manual_seed(0)
    torch.testing.assert_close(BatchAugmentation(cfg, train=True)(pixels), output)  # seeded: reproducible


def test_colour_jitter_scales_a_gray_face_within_the_factor_range(split_config):
    cfg = resolve_preprocessing(replace(split_config, **{**NO_AUGMENTATION, "color_jitter": 0.2}))
    pixels = torch.full((64, 3, 8, 8), 100, dtype=torch.uint8)  # gray: contrast and saturation leave it alone
    torch.manual_seed(0)
    output = BatchAugmentation(cfg, train=True)(pixels)
    mean, std = torch.tensor(cfg.normalize_mean).view(1, 3, 1, 1), torch.tensor(cfg.normalize_std).view(1, 3, 1, 1)
    values = output * std + mean  # back to [0, 1]
    assert values.min() >= 100 / 255 * 0.8 - 1e-5 and values.max() <= 100 / 255 * 1.2 + 1e-5
    assert values.amax((1, 2, 3)).std() > 0.01  # each image drew its own factor
    assert torch.allclose(values, values[:, :1, :1, :1].expand_as(values), atol=1e-5)  # still flat and gray


@pytest.mark.parametrize("loading", ["batch", "sample"])
def test_rank_shards_add_up_to_the_single_process_batches(split_config, loading):
    cfg = replace(split_config, loading=loading, **NO_AUGMENTATION)
    single = _epoch(build_dataloader(cfg, "train"))
    ranks = [_epoch(build_dataloader(cfg, "train", rank=rank, world_size=2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (images, ages) in enumerate(single):
        for rank in (0, 1):  # rank r holds images r, r + 2, r + 4, ... of the global batch
            assert torch.equal(ranks[rank][step][1], ages[rank::2])
            torch.testing.assert_close(ranks[rank][step][0], images[rank::2])
    blocks = [build_dataloader(cfg, "valid", rank=rank, world_size=2) for rank in (0, 1)]
    joined = torch.cat([ages for block in blocks for ages in (batch[1] for batch in block)])
    assert torch.equal(joined, torch.cat([batch[1] for batch in build_dataloader(cfg, "valid")]))


def test_matmul_convolutions_match_the_convolutions_they_replace(tmp_path):
    import copy

    from config import Config
    from model import MatmulConv2d, load_model, save_checkpoint, use_matmul_convolutions

    cfg = Config(model_name="resnet18", pretrained=False, image_size=64)
    torch.manual_seed(0)
    plain = build_model(cfg)
    fast = copy.deepcopy(plain)
    assert use_matmul_convolutions(fast, cfg.image_size) == 5  # layer4: 4 3x3 convolutions + the 1x1 shortcut
    swapped = [name for name, module in fast.named_modules() if isinstance(module, MatmulConv2d)]
    assert all(name.startswith("backbone.layer4.") for name in swapped)
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable

    images = torch.randn(6, 3, 64, 64).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
    for model in (plain, fast):
        model.backbone(images).square().mean().backward()  # (B, 512) features; train-mode batch norms
    torch.testing.assert_close(fast.backbone(images), plain.backbone(images), atol=1e-5, rtol=1e-5)
    plain_parameters = dict(plain.named_parameters())
    for name, parameter in fast.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, plain_parameters[name].grad, atol=1e-6, rtol=1e-4)

    save_checkpoint(tmp_path / "fast.pt", fast, cfg)  # loads back into the plain architecture
    reloaded, _, _ = load_model(tmp_path / "fast.pt")
    assert not any(isinstance(module, MatmulConv2d) for module in reloaded.modules())
    fast.eval()
    reloaded.eval()
    torch.testing.assert_close(reloaded.backbone(images), fast.backbone(images), atol=1e-5, rtol=1e-5)


def test_place_model_swaps_only_tiny_maps_of_resnets_on_the_cpu():
    from config import Config
    from model import MatmulConv2d

    def swapped(cfg: Config) -> int:
        model = train.place_model(cfg, build_model(cfg), torch.device("cpu"))
        return sum(isinstance(module, MatmulConv2d) for module in model.modules())

    assert swapped(Config(model_name="resnet", pretrained=False, image_size=64)) > 0
    assert swapped(Config(model_name="resnet18", pretrained=False, image_size=128)) == 0  # 4 x 4 maps: convolutions
    assert swapped(Config(model_name="efficientnet", pretrained=False, image_size=64)) == 0


def test_random_erasing_blanks_one_rectangle_in_the_chosen_share_of_faces(split_config):
    cfg = replace(split_config, **{**NO_AUGMENTATION, "erase_probability": 0.5})
    pixels = torch.full((256, 3, 32, 32), 200, dtype=torch.uint8)  # far from the mean, so erased pixels stand out
    torch.manual_seed(0)
    output = BatchAugmentation(cfg, train=True)(pixels)
    erased = output == 0  # (B, 3, S, S): the normalised mean colour
    assert torch.equal(erased, erased[:, :1].expand_as(erased))  # all three channels together
    erased = erased[:, 0]  # (B, S, S)
    chosen = erased.any((1, 2))
    assert 96 < chosen.sum() < 160  # about half of the faces
    untouched = _normalise(cfg, pixels)
    torch.testing.assert_close(output[~chosen], untouched[~chosen])
    for mask in erased[chosen]:
        rows, columns = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        box = mask[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
        assert box.all() and box.sum() == mask.sum()  # one solid rectangle
        assert 0.01 < mask.float().mean() < 0.34  # ERASE_AREA, less where the rectangle was clipped to the image
    assert not BatchAugmentation(cfg, train=False)(pixels).eq(0).any()  # never at evaluation


def test_random_erasing_is_in_the_per_image_path_too(split_config):
    cfg = replace(split_config, **{**NO_AUGMENTATION, "erase_probability": 1.0, "loading": "sample"})
    loader = build_dataloader(cfg, "train")
    images, _, _, _ = next(iter(loader))
    assert (images == 0).all(1).flatten(1).any(1).all()  # every face has erased (mean-colour) pixels


@pytest.mark.parametrize("loading", ["batch", "sample"])
def test_grey_augmentation_turns_the_chosen_share_of_faces_grey(split_config, loading):
    cfg = replace(split_config, **{**NO_AUGMENTATION, "grey_probability": 0.5, "loading": loading, "batch_size": 32})
    images = torch.cat([images for images, _, _, _ in build_dataloader(cfg, "train")])  # (N, 3, S, S)
    pixels = images * torch.tensor(resolve_preprocessing(cfg).normalize_std).view(1, 3, 1, 1)
    pixels = pixels + torch.tensor(resolve_preprocessing(cfg).normalize_mean).view(1, 3, 1, 1)  # back to [0, 1]
    grey = (pixels - pixels.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 1e-5  # (N,) equal channels
    assert 0.25 < grey.float().mean() < 0.75  # the generated faces are coloured: only the chosen ones are grey
    assert grey.any() and not grey.all()
