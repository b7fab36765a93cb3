""" Routing on the image (timm_moejet.routing_map, ``weights-tools inspect --route-image --route-plot``): each token's
core share, top-slot weight, entropy and support, laid on the patch grid or feature map; the PNG; bad input. """
import io
import math
import sys
from typing import Dict, List

import pytest
import timm
import torch
from PIL import Image

import timm_moejet  # noqa: F401
from timm_moejet.diagnostics import moe_layers
from timm_moejet.errors import InvalidArgument
from timm_moejet.routing_map import plot_routing_maps, read_route_image, routing_maps
from weights_tools.cli import main

TOL = 1e-5  # float32, the same computation as the layer's forward


def _layer_inputs(model, image: torch.Tensor) -> Dict[int, torch.Tensor]:
    """What each MoE layer receives in an eval forward of ``image``, caught by forward hooks."""
    seen, handles = {}, []
    for i, layer in moe_layers(model).items():
        handles.append(layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach())))
    with torch.no_grad():
        model.eval()(image)
    for h in handles:
        h.remove()
    return seen


def _combine(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's combine weights [N, S] for one image's tokens, asked of its router directly."""
    with torch.no_grad():
        return layer.router(x.flatten(1, -2))[1][0]


def _expected(combine: torch.Tensor, num_core_slots: int) -> Dict[str, torch.Tensor]:
    p = combine.double()
    return dict(core_share=p[:, :num_core_slots].sum(-1), top_weight=p.max(-1).values,
                entropy=-(p * torch.log(p.clamp_min(1e-300))).sum(-1) / math.log(p.shape[-1]),
                support=(p > 0).sum(-1))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.allclose(actual.double(), expected.double(), atol=TOL, rtol=0), (what, actual, expected)


def _structured_image(height: int, width: int) -> torch.Tensor:
    """A normalised image with structure (gradients and a bright square), so tokens route differently."""
    torch.manual_seed(0)
    y = torch.linspace(-1, 1, height).view(-1, 1).expand(height, width)
    x = torch.linspace(-1, 1, width).view(1, -1).expand(height, width)
    img = torch.stack([x, y, x * y]) + 0.3 * torch.randn(3, height, width)
    img[:, height // 4:height // 2, width // 4:width // 2] = 2.
    return img.unsqueeze(0)


@pytest.fixture(scope='module')
def vit():
    torch.manual_seed(0)
    return timm.create_model('moejet_vit_test', img_size=64).eval()


def test_vit_patch_tokens_lie_on_the_patch_grid_and_the_class_token_apart(vit):
    image = _structured_image(64, 64)
    maps = routing_maps(vit, image)
    inputs = _layer_inputs(vit, image)
    layers = moe_layers(vit)
    assert [m.block for m in maps] == sorted(layers) == [2, 3]
    for m in maps:
        layer = layers[m.block]
        assert m.grid == (4, 4) and m.prefix_names == ('class token',)
        expected = _expected(_combine(layer, inputs[m.block]), layer.num_core * layer.slots_per_expert)
        for name, values in expected.items():
            _assert_close(getattr(m.positions, name), values[1:].reshape(4, 4), f'block {m.block} {name}')
            _assert_close(getattr(m.prefix, name), values[:1], f'block {m.block} class token {name}')
        # the map is not flat: tokens of this image route differently
        assert float(m.positions.core_share.max() - m.positions.core_share.min()) > 1e-3


def test_prefix_tokens_are_the_class_token_then_the_registers():
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', img_size=32, reg_tokens=2).eval()
    maps = routing_maps(model, torch.randn(3, 32, 32))
    assert all(m.prefix_names == ('class token', 'register 1', 'register 2') for m in maps)
    assert all(m.grid == (2, 2) and m.prefix.core_share.shape == (3,) for m in maps)
    no_prefix = timm.create_model('moejet_vit_test', img_size=32, class_token=False, global_pool='avg').eval()
    assert all(m.prefix_names == () and m.prefix.core_share.numel() == 0 and m.grid == (2, 2)
               for m in routing_maps(no_prefix, torch.randn(3, 32, 32)))


def test_convnext_positions_are_the_feature_map_of_their_stage():
    """A 64x96 image: every position of the stage's feature map (rows before columns) is a token."""
    torch.manual_seed(0)
    model = timm.create_model('moejet_convnext_test').eval()
    image = _structured_image(64, 96)
    maps = routing_maps(model, image)
    inputs = _layer_inputs(model, image)
    layers = moe_layers(model)
    reductions = {}
    for stage_index, stage in enumerate(model.stages):
        for block in stage.blocks:
            reductions[id(block.mlp)] = model.feature_info[stage_index]['reduction']
    assert len(maps) == 3
    for m in maps:
        layer = layers[m.block]
        reduction = reductions[id(layer)]
        assert m.grid == (64 // reduction, 96 // reduction) and m.prefix_names == ()
        expected = _expected(_combine(layer, inputs[m.block]), layer.num_core * layer.slots_per_expert)
        for name, values in expected.items():
            _assert_close(getattr(m.positions, name), values.reshape(m.grid), f'block {m.block} {name}')


def test_the_figures_stay_in_their_ranges_and_the_core_share_adds_up(vit):
    maps = routing_maps(vit, _structured_image(64, 64))
    for m in maps:
        p = m.positions
        assert bool(((p.core_share >= -TOL) & (p.core_share <= 1 + TOL)).all())
        assert bool((p.top_weight >= 1. / m.num_slots - TOL).all()) and bool((p.top_weight <= 1 + TOL).all())
        assert bool(((p.entropy >= -TOL) & (p.entropy <= 1 + TOL)).all())
        assert bool(((p.support >= 1) & (p.support <= m.num_slots)).all())
        assert m.num_slots == (m.num_core + m.num_univ) * moe_layers(vit)[m.block].slots_per_expert


def test_one_image_and_a_moe_model_are_required(vit):
    with pytest.raises(InvalidArgument, match='one image'):
        routing_maps(vit, torch.randn(2, 3, 64, 64))
    with pytest.raises(InvalidArgument, match='no SpheroMoE layer'):
        routing_maps(timm.create_model('vit_tiny_patch16_224', depth=1, img_size=32), torch.randn(3, 32, 32))


def test_the_image_is_read_with_the_model_data_config(vit, tmp_path):
    path = tmp_path / 'photo.jpg'
    Image.new('RGB', (100, 80), (200, 30, 90)).save(path)
    pixels, display = read_route_image(path, vit)
    assert pixels.shape == (3, 64, 64) and display.shape == (64, 64, 3)
    # the display undoes the normalisation: the colour comes back (JPEG: within 4/255)
    assert torch.allclose(display.mean(dim=(0, 1)), torch.tensor([200, 30, 90]) / 255., atol=4 / 255)
    png = plot_routing_maps(routing_maps(vit, pixels), display)
    assert png.startswith(b'\x89PNG') and Image.open(io.BytesIO(png)).size[0] > 100
    assert list(tmp_path.iterdir()) == [path]  # no path: nothing written


@pytest.fixture()
def photo(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / 'photo.jpg'
    Image.fromarray((torch.rand(90, 120, 3) * 255).byte().numpy()).save(path)
    return path


@pytest.mark.parametrize('model', ['moejet_vit_test', 'moejet_convnext_test'])
def test_the_command_writes_the_routing_picture(model, photo, tmp_path, capsys):
    out = tmp_path / 'plots' / 'routing.png'  # its folder is made, as for every output
    status = main(['inspect', model, '--model-kwargs', 'img_size=64', '--route-image', str(photo), '--route-plot',
                   str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert f'router diagnostics on the image {photo}' in text and f'routing plot written to {out}' in text
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.size[1] > png.size[0]  # one row per MoE layer
    assert sorted(p.name for p in tmp_path.iterdir()) == ['photo.jpg', 'plots']
    assert list(out.parent.iterdir()) == [out]


def _bad_input_cases() -> List[tuple]:
    return [
        (['--route-plot', '{out}'], 'name it with --route-image'),
        (['--route-image', '{dir}/missing.jpg', '--route-plot', '{out}'], 'does not exist'),
        (['--route-image', '{text}', '--route-plot', '{out}'], 'cannot be read'),
        (['--route-image', '{photo}', '--route-plot', '{dir}/out.jpg'], '--route-plot must name a .png file'),
    ]


@pytest.mark.parametrize('extra, fragment', _bad_input_cases())
def test_bad_input_gets_one_line_and_writes_nothing(extra, fragment, photo, tmp_path, capsys):
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image')
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ['inspect', 'moejet_vit_test'] + [a.format(out=tmp_path / 'out.png', dir=tmp_path, text=text, photo=photo)
                                             for a in extra]
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_dense_model_is_refused(photo, tmp_path, capsys):
    status = main(['inspect', 'vit_tiny_patch16_224', '--model-kwargs', 'depth=1', '--route-image', str(photo),
                   '--route-plot', str(tmp_path / 'out.png')])
    err = capsys.readouterr().err.strip()
    assert status == 2 and 'has no SpheroMoE layer' in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['photo.jpg']


def test_without_matplotlib_one_line_names_the_plot_extra(photo, tmp_path, capsys, monkeypatch):
    for name in list(sys.modules):
        if name == 'matplotlib' or name.startswith('matplotlib.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import fails as if the package were not installed
    status = main(['inspect', 'moejet_vit_test', '--route-image', str(photo), '--route-plot',
                   str(tmp_path / 'out.png')])
    err = capsys.readouterr().err.strip()
    assert status == 2 and 'pip install "timm-moejet[plot]"' in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['photo.jpg']


def test_mixer_tokens_are_its_patches_without_prefix():
    torch.manual_seed(0)
    model = timm.create_model('moejet_mixer_test').eval()
    size = model.pretrained_cfg['input_size'][1:]
    maps = routing_maps(model, torch.randn(3, *size))
    assert maps and all(m.grid == tuple(model.stem.grid_size) and m.prefix_names == () for m in maps)
