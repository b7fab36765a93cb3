"""Fixtures several test files share: small dense donors as timm Hub folders and weights files, and images."""
import pytest
import torch
from hub_cache import small_dense_vit
from safetensors.torch import save_file


@pytest.fixture(scope='module')
def dense_folder(tmp_path_factory):
    """A dense donor as a timm Hub folder and as a weights file, and the digits as an image folder."""
    from timm.models import save_for_hf

    from benchmarks.digits.data import write_digits_image_folder

    root = tmp_path_factory.mktemp('dense_folder')
    donor = small_dense_vit(0)
    save_for_hf(donor, str(root / 'donor'), safe_serialization=True)
    save_file(donor.state_dict(), str(root / 'donor.safetensors'))
    write_digits_image_folder(str(root / 'digits'), image_size=16)
    return root


@pytest.fixture(scope='module')
def donors(tmp_path_factory):
    """Hub folders of a plain ViT, one with LayerScale, one with q/k norms, a DeiT III-style one (LayerScale, no
    class embedding), and a weights file of the plain one."""
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp('donors')
    variants = dict(vit={}, vit_ls=dict(init_values=0.1), vit_qk=dict(qk_norm=True),
                    vit_deit3=dict(init_values=0.1, no_embed_class=True))
    for i, (name, kwargs) in enumerate(variants.items()):
        model = small_dense_vit(i, **kwargs)
        if 'init_values' in kwargs:  # gammas that differ per channel, so a dropped one shows
            with torch.no_grad():
                for block in model.blocks:
                    block.ls1.gamma.uniform_(0.05, 0.5)
                    block.ls2.gamma.uniform_(0.05, 0.5)
        save_for_hf(model, str(root / name), safe_serialization=True)
    save_file(small_dense_vit(0).state_dict(), str(root / 'vit.safetensors'))
    return root


@pytest.fixture(scope='session')
def tiny_images(tmp_path_factory):
    """A tiny ImageFolder: ``train/<class>/*.png``, 2 classes of 8 random 32 x 32 images (2 batches of 8)."""
    from PIL import Image

    root = tmp_path_factory.mktemp('tiny_images')
    g = torch.Generator().manual_seed(0)
    for label in ('a', 'b'):
        (root / 'train' / label).mkdir(parents=True)
        for i in range(8):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / 'train' / label / f'{i}.png')
    return root


@pytest.fixture(scope='session')
def trainer_command(tiny_images):
    """The trainer's command line of the hardening checks: ``moejet_vit_test`` at 32 x 32 on ``tiny_images``, 1 epoch
    of 2 batches, one process; ``trainer_command(output, *extra)`` writes under ``output/run``."""
    def argv(output, *extra: str) -> list:
        return ['--model', 'moejet_vit_test', '--model-kwargs', 'img_size=32', 'patch_size=8', '--img-size', '32',
                '--num-classes', '10', '-b', '8', '--epochs', '1', '--workers', '0', '--output', str(output),
                '--experiment', 'run', '--data-dir', str(tiny_images), *extra]
    return argv


@pytest.fixture
def trainer_argv(trainer_command, tmp_path):
    """:func:`trainer_command` writing under ``tmp_path/runs``: ``trainer_argv('--epochs', '2')``."""
    return lambda *extra: trainer_command(tmp_path / 'runs', *extra)


@pytest.fixture
def gloo():
    """A one-process gloo group (in-process sharding), torch on one thread."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
