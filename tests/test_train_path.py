""" The timm train.py path, driven through the same timm APIs train.py calls, on the real digits (CPU, offline).

train.py itself is not shipped with timm's wheel, so CI exercises its wiring: ``create_model`` with
``--model-kwargs``-style kwargs, ``--pretrained-path`` / ``--initial-checkpoint`` loading, ``create_optimizer_v2``
with layer decay, ``create_dataset``/``create_loader`` (RandAugment, random erasing), ``Mixup``, ``ModelEmaV3``,
bf16 autocast, gradient checkpointing, ``torch.compile`` and ``CheckpointSaver``/``resume_checkpoint``.
"""
import math
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3, dispatch_clip_grad

import timm_moejet  # noqa: F401  (registers the models, as train.py's --device-modules timm_moejet does)
from benchmarks.digits.data import write_digits_image_folder

IMG = 32
# what `--model-kwargs img_size=32 patch_size=8 moe_expert_drop=0.1` gives train.py's create_model call
MODEL_KWARGS = dict(img_size=IMG, patch_size=8, moe_expert_drop=0.1)
LAYER_DECAY = 0.6


@pytest.fixture(scope='module')
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('digits') / 'folder'
    counts = write_digits_image_folder(str(root), image_size=IMG, val_fraction=0.2, seed=0)
    assert counts['train'] + counts['validation'] == 1797
    return str(root)


def _create(**kwargs):
    # the arguments train.py passes (drop path from --drop-path), plus --model-kwargs
    return timm.create_model('moejet_vit_test', **{**MODEL_KWARGS, 'num_classes': 10, 'drop_path_rate': 0.1, **kwargs})


def _param_groups(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g['lr_scale'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']}


def _assert_all_grads(model, step):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'step {step}: parameters without a gradient (DDP would fail): {missing}'
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f'step {step}: non-finite gradients in {bad}'


def _loader(root, model, split, batch_size, is_training):
    dataset = create_dataset('', root=root, split=split, is_training=is_training)
    cfg = resolve_data_config({'img_size': IMG}, model=model)  # train.py's --img-size
    return create_loader(
        dataset, input_size=cfg['input_size'], batch_size=batch_size, is_training=is_training,
        mean=cfg['mean'], std=cfg['std'], interpolation=cfg['interpolation'], crop_pct=cfg['crop_pct'],
        num_workers=0, auto_augment='rand-m9-mstd0.5-inc1' if is_training else None,
        re_prob=0.25 if is_training else 0., device=torch.device('cpu'))


def test_layer_decay_groups_moe_at_full_lr_and_trunk_decays():
    model = timm.create_model('moejet_vit_tiny', num_classes=10, device='meta')  # groups only: no memory
    groups = _param_groups(create_optimizer_v2(model, 'adamw', lr=4e-3, weight_decay=0.05,
                                               layer_decay=LAYER_DECAY), model)
    moe_names = [n for n in groups if n.split('.')[0] == 'blocks' and int(n.split('.')[1]) in model.moe_blocks
                 and n.split('.')[2] in ('mlp', 'norm2')]
    assert len(moe_names) == 6 * 14  # per MoE block: norm2 (2), slot queries, slot norm (2), temperature, experts (8)
    assert {groups[n][0] for n in moe_names} == {1.0}
    assert groups['head.weight'][0] == 1.0
    # the dense trunk decays by depth (released recipe: block i at 0.6 ** (12 - i), the stem at 0.6 ** 13)
    for i in range(12):
        assert math.isclose(groups[f'blocks.{i}.attn.qkv.weight'][0], LAYER_DECAY ** (12 - i), rel_tol=1e-9)
    for i in range(6):
        assert math.isclose(groups[f'blocks.{i}.mlp.fc1.weight'][0], LAYER_DECAY ** (12 - i), rel_tol=1e-9)
    assert math.isclose(groups['patch_embed.proj.weight'][0], LAYER_DECAY ** 13, rel_tol=1e-9)
    # weight decay: none for temperatures, biases of every shape (experts' are 2-D), norms, position embedding
    no_wd = ['blocks.6.mlp.router.log_temperature', 'blocks.6.mlp.core.fc1.bias', 'blocks.11.mlp.univ.fc2.bias',
             'blocks.6.mlp.router.slot_norm.weight', 'blocks.6.norm2.weight', 'fc_norm.weight', 'pos_embed',
             'head.bias']
    assert model.blocks[6].mlp.core.fc1.bias.ndim == 2
    assert {n: groups[n][1] for n in no_wd} == {n: 0. for n in no_wd}
    wd = ['blocks.6.mlp.core.fc1.weight', 'blocks.6.mlp.univ.fc2.weight', 'blocks.6.mlp.router.slot_queries',
          'blocks.0.attn.qkv.weight', 'head.weight']
    assert {n: groups[n][1] for n in wd} == {n: 0.05 for n in wd}


def test_train_path_steps_ema_amp_checkpoint_resume(digits_root, tmp_path):
    torch.manual_seed(0)
    model = _create()
    loader = _loader(digits_root, model, 'train', batch_size=16, is_training=True)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    criterion = SoftTargetCrossEntropy()
    optimizer = create_optimizer_v2(model, 'adamw', lr=4e-3, weight_decay=0.05, layer_decay=LAYER_DECAY)
    ema = ModelEmaV3(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.set_grad_checkpointing(True)
    model.train()
    losses = []
    for step, (x, y) in enumerate(loader):
        assert x.shape == (16, 3, IMG, IMG)
        x, y = mixup(x, y)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _assert_all_grads(model, step)
        dispatch_clip_grad(model.parameters(), 5.0)
        optimizer.step()
        ema.update(model, step=step)
        losses.append(loss.item())
        if step == 3:
            break
    assert all(math.isfinite(v) for v in losses), losses
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start), f'not updated: {sorted(set(start) - set(moved))}'
    ema_sd = ema.module.state_dict()
    assert all(torch.isfinite(v).all() for v in ema_sd.values() if v.is_floating_point())
    assert not torch.equal(ema_sd['blocks.3.mlp.core.fc1.weight'], model.blocks[3].mlp.core.fc1.weight)

    # CheckpointSaver as train.py uses it, then --resume into a fresh model and optimizer
    saver = CheckpointSaver(model, optimizer, model_ema=ema, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path),
                            max_history=1)
    saver.save_checkpoint(epoch=0, metric=10.)
    path = os.path.join(str(tmp_path), 'last.pth.tar')
    fresh = _create()
    fresh_opt = create_optimizer_v2(fresh, 'adamw', lr=4e-3, weight_decay=0.05, layer_decay=LAYER_DECAY)
    next_epoch = resume_checkpoint(fresh, path, optimizer=fresh_opt, log_info=False)
    assert next_epoch == 1
    for n, p in fresh.named_parameters():
        assert torch.equal(p, model.get_parameter(n)), n
    assert fresh_opt.state_dict()['state'].keys() == optimizer.state_dict()['state'].keys()
    exp_avg = [s['exp_avg'] for s in fresh_opt.state_dict()['state'].values()]
    assert all(torch.equal(a, b['exp_avg']) for a, b in zip(exp_avg, optimizer.state_dict()['state'].values()))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _create()
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 3, 5, 9])
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same dropout, drop path and routing noise in both runs
        torch.nn.functional.cross_entropy(model(x), y).backward()
        _assert_all_grads(model, 0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = _create().eval()
    x = torch.randn(2, 3, IMG, IMG)
    # aot_eager traces the whole graph (fullgraph: no breaks) and autograd, without inductor's C++ compile time
    # one compiled graph (eval: no dropout or noise, so eager is the reference); backward through it too
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    _assert_all_grads(model, 0)


def test_pretrained_path_and_initial_checkpoint(digits_root, tmp_path):
    torch.manual_seed(0)
    source = _create(num_classes=7)
    path = str(tmp_path / 'model.safetensors')
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)

    # --pretrained-path P: file overlay, head dropped (num_classes=-1) and re-made for the new task
    model = _create(pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=-1))
    assert model.head.weight.shape == (10, 64)
    for n, v in source.state_dict().items():
        if not n.startswith('head.'):
            assert torch.equal(model.state_dict()[n], v), n

    # --initial-checkpoint P: strict load after build (same head size)
    model = _create(num_classes=7, checkpoint_path=path)
    for n, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[n], v), n

    # --pretrained-path to a *dense* ViT checkpoint of the trunk's shape: recycled into the MoE on load
    dense = timm.create_model('vit_tiny_patch16_224', img_size=IMG, patch_size=8, embed_dim=64, depth=4, num_heads=2,
                              global_pool='avg', num_classes=7)
    dense_path = str(tmp_path / 'dense.safetensors')
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, dense_path)
    model = _create(pretrained=True, pretrained_cfg_overlay=dict(file=dense_path, num_classes=-1))
    assert torch.equal(model.blocks[3].attn.qkv.weight, dense.blocks[3].attn.qkv.weight)
    donor_rows = {tuple(r.tolist()) for r in dense.blocks[3].mlp.fc1.weight}
    for expert in model.blocks[3].mlp.univ.fc1.weight:  # universal experts: hidden units of the donor MLP
        assert all(tuple(r.tolist()) in donor_rows for r in expert)

    # a few steps on the real digits from the loaded weights, the validation loader as train.py builds it
    model = _create(pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=-1))
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=LAYER_DECAY)
    loader = _loader(digits_root, model, 'validation', batch_size=32, is_training=False)
    model.train()
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _assert_all_grads(model, step)
        optimizer.step()
        if step == 1:
            break


def test_paper_randaugment_runs_every_op_at_full_magnitude():
    # the paper's rand-m9-mstd0.5-inc1 samples magnitudes up to 10, where PosterizeIncreasing keeps 0 bits
    # (Pillow 13 raises on that inside a train.py data worker; install pillow<13 for that recipe: docs/training.md)
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    transform = rand_augment_transform('rand-m10-mstd0-inc1', dict(translate_const=10, img_mean=(128, 128, 128)))
    img = Image.new('RGB', (IMG, IMG), (200, 100, 50))
    names = []
    for op in transform.ops:
        op.prob = 1.
        out = op(img)
        assert out.size == img.size, op.name
        names.append(op.name)
    assert 'PosterizeIncreasing' in names


def test_digits_image_folder_is_deterministic_and_refuses_to_overwrite(tmp_path):
    a = write_digits_image_folder(str(tmp_path / 'a'), image_size=8, val_fraction=0.25, seed=1)
    b = write_digits_image_folder(str(tmp_path / 'b'), image_size=8, val_fraction=0.25, seed=1)
    write_digits_image_folder(str(tmp_path / 'c'), image_size=8, val_fraction=0.25, seed=2)

    def listing(root, split):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, split))
                      for f in fs)
    assert a == b and a['train'] + a['validation'] == 1797
    assert abs(a['validation'] / 1797 - 0.25) < 0.01  # stratified rounding per class
    assert listing(str(tmp_path / 'a'), 'validation') == listing(str(tmp_path / 'b'), 'validation')
    assert listing(str(tmp_path / 'a'), 'validation') != listing(str(tmp_path / 'c'), 'validation')
    assert len(os.listdir(tmp_path / 'a' / 'train')) == 10
    with pytest.raises(ValueError, match='not empty'):
        write_digits_image_folder(str(tmp_path / 'a'), image_size=8)
    with pytest.raises(ValueError, match='image_size'):
        write_digits_image_folder(str(tmp_path / 'd'), image_size=4)
    assert not (tmp_path / 'd').exists()


def test_demo_runs_recycling_and_fine_tuning(tmp_path, capsys):
    from benchmarks.digits.demo import main
    threads = torch.get_num_threads()
    try:
        curves = main(['--epochs', '2', '--donor-epochs', '2', '--out-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the demo sets its own
    out = capsys.readouterr().out
    assert set(curves) == {'moe_jetpack', 'moe_scratch', 'dense_donor'}
    assert all(len(c) == 2 and all(0. <= a <= 100. for a in c) for c in curves.values())
    assert "'strategy': 'importance'" in out and 'summary' in out
    for name in ('donor_narrow', 'donor_wide', 'wide_donor_stats', 'moe_recycled', 'moe_finetuned'):
        assert (tmp_path / f'{name}.safetensors').is_file(), name


def test_float16_autocast_step_gives_finite_gradients_everywhere():
    # train.py --amp --amp-dtype float16 (GPUs without bf16); routing runs in float32 inside the layer
    torch.manual_seed(0)
    model = _create()
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 3, 5, 9])
    with torch.autocast('cpu', dtype=torch.float16):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    assert logits.dtype == torch.float16
    loss.backward()
    _assert_all_grads(model, 0)


def test_ddp_without_find_unused_parameters(tmp_path):
    # train.py wraps the model in DDP without find_unused_parameters: a parameter left out of a step's graph makes
    # the next step raise ("Expected to have finished reduction in the prior iteration"). gloo, one process, CPU.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(_create())
        optimizer = create_optimizer_v2(model.module, 'adamw', lr=1e-3, layer_decay=LAYER_DECAY)
        x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 3, 5, 9])
        for step in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _assert_all_grads(model.module, step)
            optimizer.step()
    finally:
        dist.destroy_process_group()
