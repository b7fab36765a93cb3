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
