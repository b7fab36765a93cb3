""" The routing operator's Triton kernels against the reference math, on the CPU through Triton's interpreter.

Triton decides at ``@triton.jit`` whether a kernel is interpreted, and timm imports Triton, so ``TRITON_INTERPRET=1``
has to be in the environment before the process starts: one subprocess (this file run as a script) runs every case
below through ``routing_forward`` and ``routing_backward`` and writes inputs and outputs to a safetensors file. The
tests compute the reference here, in float32: ``SpheroMoE.route``'s math on the same scores, with the noise of
``routing_noise`` and ``entmax15_halved``, and its gradients by autograd.

Tolerances, |kernel - reference| <= atol + rtol |reference| (measured figures: the largest over the cases):

* forward, float32 outputs: atol 1e-6, rtol 1e-5 (measured: 1.5e-8 on dispatch, 9.5e-7 on combine, where the
  threshold's sums run in another order; at most 0.29 of the allowance);
* forward, bfloat16 / float16 outputs: atol 1e-6, rtol half the dtype's eps plus 1e-5: the output rounded to
  nearest once (measured up to 0.96 of the allowance; truncation, the interpreter's own bfloat16 cast, reaches 1.95);
* backward against its formulas evaluated in float64 on the kernels' own (rounded) outputs: 1e-5 of the largest
  gradient (measured 1.8e-6), every dtype;
* backward against autograd through the float32 reference: 1e-5 of the largest gradient for float32 outputs
  (measured 2.8e-6); 8 eps of the dtype for bfloat16 / float16 outputs, which the backward reads as it does in
  training (measured up to 3.3 eps, on g_cscale of a saturated bfloat16 softmax; 0.45 eps elsewhere).

The kernels are also compiled for sm_90 (Triton's compiler and ptxas need no GPU); where a CUDA device is present
the same cases run through the compiled kernels.
"""
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from timm_moejet.layers import routing_triton
from timm_moejet.layers.entmax import entmax15_halved

# name: (batch, tokens, slots, sparse, noise_std, output dtype, inverse temperature of the combine)
CASES = {
    'vit_197x294_entmax_noise_float32': (1, 197, 294, True, 0.5, 'float32', 20.),
    'vit_197x294_softmax_bfloat16': (1, 197, 294, False, 0., 'bfloat16', 2.),
    'convnext_196x294_entmax_float16': (1, 196, 294, True, 0., 'float16', 2.),
    'convnext_196x294_softmax_noise_float32': (1, 196, 294, False, 0.5, 'float32', 20.),
    'convnext_49x72_entmax_noise_bfloat16': (1, 49, 72, True, 0.5, 'bfloat16', 20.),
    'convnext_49x72_entmax_float32': (1, 49, 72, True, 0., 'float32', 2.),
    'convnext_49x72_softmax_noise_float16': (1, 49, 72, False, 0.5, 'float16', 2.),
    'odd_17x63_batch3_entmax_noise_float16': (3, 17, 63, True, 0.5, 'float16', 20.),
    'odd_17x63_batch3_softmax_bfloat16': (3, 17, 63, False, 0., 'bfloat16', 20.),
    'odd_17x63_batch3_entmax_float32': (3, 17, 63, True, 0., 'float32', 2.),
    # more tokens than a dispatch column holds in registers: the two-pass softmax over tokens
    'tokens_1030x9_entmax_noise_float32': (1, 1030, 9, True, 0.5, 'float32', 20.),
}
# backward with no gradient to dispatch and a non-contiguous one to combine (the layouts autograd may hand over)
COMBINE_GRAD_ONLY = 'odd_17x63_batch3_entmax_float32'
NOISE_SEED = 2 ** 40 + 12345  # above 2**32: both halves of the Philox key matter
FORWARD_ATOL = 1e-6
# half a step of the output's rounding (to nearest), and float32's 1e-5
FORWARD_RTOL = {'float32': 1e-5, 'bfloat16': torch.finfo(torch.bfloat16).eps / 2 + 1e-5,
                'float16': torch.finfo(torch.float16).eps / 2 + 1e-5}
BACKWARD_TOL = 1e-5  # of the largest gradient
AUTOGRAD_TOL = {'float32': 1e-5, 'bfloat16': 8 * torch.finfo(torch.bfloat16).eps,
                'float16': 8 * torch.finfo(torch.float16).eps}


def case_inputs(name: str) -> Dict[str, torch.Tensor]:
    """Cosine-like routing scores (tokens . unit slot queries), scales as SpheroMoE computes them, and output
    gradients in the output dtype."""
    batch, tokens, slots, sparse, _, dtype, inv_temp = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name))
    x = torch.randn(batch, tokens, 32, generator=gen)
    queries = torch.nn.functional.normalize(torch.randn(slots, 32, generator=gen), dim=-1)
    inv_norm = 1. / x.norm(dim=-1, keepdim=True)
    out_dtype = getattr(torch, dtype)
    return dict(raw=x @ queries.T, dscale=inv_norm * 2., cscale=inv_norm * (inv_temp * 0.5 if sparse else inv_temp),
                grad_dispatch=torch.randn(batch, tokens, slots, generator=gen).to(out_dtype),
                grad_combine=torch.randn(batch, tokens, slots, generator=gen).to(out_dtype))


def run_kernels(name: str, device: str = 'cpu') -> Dict[str, torch.Tensor]:
    """One case through the kernels (on the CPU: in the interpreter process)."""
    _, _, _, sparse, noise_std, dtype, _ = CASES[name]
    t = {key: value.to(device) for key, value in case_inputs(name).items()}
    dispatch, combine = routing_triton.routing_forward(t['raw'], t['dscale'], t['cscale'], noise_std, NOISE_SEED,
                                                       sparse, getattr(torch, dtype))
    grad_dispatch, grad_combine = t['grad_dispatch'], t['grad_combine']
    if name == COMBINE_GRAD_ONLY:
        grad_dispatch, grad_combine = None, grad_combine.transpose(1, 2).contiguous().transpose(1, 2)
    g_raw, g_dscale, g_cscale = routing_triton.routing_backward(grad_dispatch, grad_combine, dispatch, combine,
                                                                t['raw'], t['dscale'], t['cscale'], sparse)
    return {key: value.cpu() for key, value in dict(dispatch=dispatch, combine=combine, g_raw=g_raw,
                                                     g_dscale=g_dscale, g_cscale=g_cscale).items()}


def reference(name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """SpheroMoE.route's math in float32 with the kernels' noise, and its gradients by autograd."""
    _, _, _, sparse, noise_std, _, _ = CASES[name]
    t = case_inputs(name)
    raw, dscale, cscale = (t[k].clone().requires_grad_() for k in ('raw', 'dscale', 'cscale'))
    noise = routing_triton.routing_noise(raw.shape, NOISE_SEED, raw.device).mul_(noise_std)
    dispatch = torch.softmax(torch.addcmul(noise, raw, dscale), dim=1)
    combine_logits = torch.addcmul(noise * 0.5 if sparse else noise, raw, cscale)
    combine = entmax15_halved(combine_logits, dim=-1) if sparse else torch.softmax(combine_logits, dim=-1)
    grads = {'dispatch': t['grad_dispatch'].float(), 'combine': t['grad_combine'].float()}
    if name == COMBINE_GRAD_ONLY:
        grads['dispatch'] = torch.zeros_like(grads['dispatch'])
    g_raw, g_dscale, g_cscale = torch.autograd.grad((dispatch, combine), (raw, dscale, cscale),
                                                    (grads['dispatch'], grads['combine']))
    return dict(dispatch=dispatch.detach(), combine=combine.detach()), dict(g_raw=g_raw, g_dscale=g_dscale,
                                                                            g_cscale=g_cscale)


@pytest.fixture(scope='module')
def kernel_results(tmp_path_factory) -> Dict[str, torch.Tensor]:
    """Every case through the kernels, in one interpreter subprocess."""
    out = tmp_path_factory.mktemp('routing_kernels') / 'results.safetensors'
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(out))


def _case(results: Dict[str, torch.Tensor], name: str) -> Dict[str, torch.Tensor]:
    return {key.split('/', 1)[1]: value for key, value in results.items() if key.startswith(name + '/')}


@pytest.mark.parametrize('name', sorted(CASES))
def test_forward_matches_the_reference(kernel_results, name):
    dtype = CASES[name][5]
    got = _case(kernel_results, name)
    expected, _ = reference(name)
    for key in ('dispatch', 'combine'):
        assert got[key].dtype == getattr(torch, dtype)
        torch.testing.assert_close(got[key].float(), expected[key], atol=FORWARD_ATOL, rtol=FORWARD_RTOL[dtype],
                                   msg=lambda m, key=key: f'{key}: {m}')


def spec_backward(name: str, got: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The operator's backward formulas (float64) on what the kernels read: their own dispatch and combine."""
    sparse = CASES[name][3]
    t = {k: v.double() for k, v in case_inputs(name).items()}
    dispatch, combine = got['dispatch'].double(), got['combine'].double()
    g_dispatch, g_combine = t['grad_dispatch'], t['grad_combine']
    if name == COMBINE_GRAD_ONLY:
        g_dispatch = torch.zeros_like(g_dispatch)
    gd = dispatch * (g_dispatch - (g_dispatch * dispatch).sum(1, keepdim=True))
    if sparse:  # entmax-1.5 on halved scores: combine = r^2, gradient 2 r (g - sum(g r) / sum(r))
        r = combine.sqrt()
        gc = 2. * (g_combine * r - r * (g_combine * r).sum(-1, keepdim=True) / r.sum(-1, keepdim=True))
    else:
        gc = combine * (g_combine - (g_combine * combine).sum(-1, keepdim=True))
    return dict(g_raw=gd * t['dscale'] + gc * t['cscale'], g_dscale=(gd * t['raw']).sum(-1, keepdim=True),
                g_cscale=(gc * t['raw']).sum(-1, keepdim=True))


def _assert_close_to_max(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], tol: float) -> None:
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 and got[key].shape == value.shape
        torch.testing.assert_close(got[key].double(), value.double(), atol=tol * value.abs().max().item(), rtol=0.,
                                   msg=lambda m, key=key: f'{key}: {m}')


@pytest.mark.parametrize('name', sorted(CASES))
def test_backward_computes_the_formulas(kernel_results, name):
    """Against the backward formulas on the kernels' own (rounded) outputs: the kernels' arithmetic alone."""
    got = _case(kernel_results, name)
    _assert_close_to_max(got, spec_backward(name, got), BACKWARD_TOL)


@pytest.mark.parametrize('name', sorted(CASES))
def test_backward_matches_autograd(kernel_results, name):
    """Against autograd through the float32 reference: the formulas are its gradient (float32 outputs), and reading
    bfloat16 / float16 outputs costs what the docstring states."""
    _, expected = reference(name)
    _assert_close_to_max(_case(kernel_results, name), expected, AUTOGRAD_TOL[CASES[name][5]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (the CPU checks are the ones above)')
@pytest.mark.parametrize('name', sorted(CASES))
def test_compiled_kernels_match_the_reference_on_cuda(name):
    """The same cases through the compiled kernels on a GPU, with the same tolerances (CUDA's log and cos in the
    noise differ from the CPU's by float32 rounding)."""
    got = run_kernels(name, 'cuda')
    expected, expected_grads = reference(name)
    dtype = CASES[name][5]
    for key in ('dispatch', 'combine'):
        torch.testing.assert_close(got[key].float(), expected[key], atol=FORWARD_ATOL, rtol=FORWARD_RTOL[dtype])
    _assert_close_to_max(got, spec_backward(name, got), BACKWARD_TOL)
    _assert_close_to_max(got, expected_grads, AUTOGRAD_TOL[dtype])


def test_the_noise_moves_the_outputs(kernel_results):
    """The noisy cases differ from the same math without noise by far more than the tolerance (the kernels drew
    it, and at the offsets routing_noise uses: the forward tests match only with it)."""
    name = 'vit_197x294_entmax_noise_float32'
    t = case_inputs(name)
    quiet = torch.softmax(t['raw'] * t['dscale'], dim=1)
    assert (_case(kernel_results, name)['dispatch'] - quiet).abs().max() > 100 * FORWARD_ATOL


def test_routing_noise_is_standard_normal_and_seeded():
    a = routing_triton.routing_noise((4, 100, 250), NOISE_SEED, torch.device('cpu'))
    assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 1.) < 0.01  # 1e5 draws: 3e-3 standard error
    assert torch.equal(a, routing_triton.routing_noise((4, 100, 250), NOISE_SEED, torch.device('cpu')))
    b = routing_triton.routing_noise((4, 100, 250), NOISE_SEED + 1, torch.device('cpu'))
    c = routing_triton.routing_noise((4, 100, 250), NOISE_SEED + 2 ** 32, torch.device('cpu'))
    assert (a - b).abs().mean() > 0.5 and (a - c).abs().mean() > 0.5


def test_importing_without_triton_leaves_it_unavailable(monkeypatch):
    """The package imports where Triton is missing; available() then says False (the tensor-op path serves)."""
    import importlib.util
    monkeypatch.setitem(sys.modules, 'triton', None)
    monkeypatch.setitem(sys.modules, 'triton.language', None)
    spec = importlib.util.spec_from_file_location('timm_moejet.layers._routing_triton_without_triton',
                                                  routing_triton.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None and not module.available()
    assert routing_triton.available()  # the tested installation has Triton


# each kernel's variants, in the dtype of its outputs and gradients, compiled for one CUDA architecture
COMPILED = [
    ('_forward_kernel', 'bf16', dict(HAS_NOISE=True, SPARSE=True, NEWTON=4, BLOCK_N=256, BLOCK_S=16, SINGLE=True,
                                     ROWS=8, ROW_BLOCK_S=512)),
    ('_forward_kernel', 'fp32', dict(HAS_NOISE=False, SPARSE=False, NEWTON=4, BLOCK_N=256, BLOCK_S=16, SINGLE=False,
                                     ROWS=8, ROW_BLOCK_S=512)),
    ('_dispatch_colsum_kernel', 'bf16', dict(BLOCK_N=32, BLOCK_S=128)),
    ('_backward_rows_kernel', 'bf16', dict(HAS_GD=True, HAS_GC=True, SPARSE=True, ROWS=8, BLOCK_S=512)),
]


def _signature(fn, out: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    """Argument types of a kernel: pointers to outputs and gradients in ``out``, the rest float32; strides and the
    seed int64; other scalars int32."""
    def kind(name: str) -> str:
        if name in constexprs:
            return 'constexpr'
        if name.endswith('_ptr'):
            return '*' + (out if name.split('_')[0] in ('dispatch', 'combine', 'gd', 'gc') else 'fp32')
        if name in ('noise_std', 'inv_sqrt_s'):
            return 'fp32'
        return 'i64' if name == 'seed' or name[-3:] in ('_sb', '_sn', '_ss') else 'i32'
    return {name: kind(name) for name in fn.arg_names}


@pytest.mark.parametrize('kernel, out, constexprs', COMPILED, ids=[f'{k}-{o}' for k, o, _ in COMPILED])
def test_the_kernels_compile_for_cuda(kernel, out, constexprs, tmp_path, monkeypatch):
    """What the interpreter does not check, Triton's compiler does, without a GPU: the kernels lower to sm_90
    machine code (through ptxas) for the variants the launches use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path))  # compile every time, and leave the user's cache alone
    fn = getattr(routing_triton, kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        pytest.skip('TRITON_INTERPRET is set in this process: the kernels are interpreted, not compiled')
    source = ASTSource(fn=fn, signature=_signature(fn, out, constexprs),
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32), options={'num_warps': 8})
    assert compiled.asm['cubin'] and compiled.metadata.num_warps == 8


def _main(out: str, names: Optional[list] = None) -> None:
    assert os.environ.get('TRITON_INTERPRET') == '1', 'run with TRITON_INTERPRET=1 (the kernels on the CPU)'
    results = {}
    for name in names or sorted(CASES):
        start = time.perf_counter()
        results.update({f'{name}/{key}': value.contiguous() for key, value in run_kernels(name).items()})
        print(f'{name}: {time.perf_counter() - start:.1f} s', file=sys.stderr)
    save_file(results, out)


if __name__ == '__main__':
    _main(sys.argv[1], sys.argv[2:])
