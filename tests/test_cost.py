"""Cost accounting: parameter split and op-counted MACs agree with exact hand counts."""
import timm
import torch

import timm_moejet  # noqa: F401
from timm_moejet.cost import count_macs, count_params


def test_moe_macs_equal_dense_plus_exact_routing_and_expert_counts():
    moe = timm.create_model('moejet_vit_test', device='meta')
    dense = timm.create_model(
        'vit_tiny_patch16_224', img_size=64, embed_dim=64, depth=4, num_heads=2, global_pool='avg', device='meta')
    n, d, s = 17, 64, 12  # tokens, width, slots (4 core + 8 universal, 1 slot each)
    routing = 3 * n * s * d  # logits, dispatch, combine
    experts = 4 * (2 * d * 256) + 8 * (2 * d * 64)  # one slot row through each expert's fc1 and fc2
    dense_mlp = n * 2 * d * 256
    expected = count_macs(dense, input_size=(3, 64, 64))['macs'] + 2 * (routing + experts - dense_mlp)
    assert count_macs(moe)['macs'] == expected


class _Skip(torch.nn.Module):
    def forward(self, x, **kwargs):
        return x


def test_attention_is_counted_on_real_tensors_too():
    model = timm.create_model('moejet_vit_test')
    assert count_macs(model)['macs'] == count_macs(timm.create_model('moejet_vit_test', device='meta'))['macs']
    # per block: qkv (n d 3d), QK^T and AV (2 n n d), output projection (n d d)
    no_attn = timm.create_model('moejet_vit_test', device='meta')
    for blk in no_attn.blocks:
        blk.attn = _Skip()
    n, d = 17, 64
    attention = 4 * (n * d * 3 * d + 2 * n * n * d + n * d * d)
    assert count_macs(model)['macs'] - count_macs(no_attn)['macs'] == attention


def test_param_split():
    model = timm.create_model('moejet_vit_test', device='meta')
    counts = count_params(model)
    d = 64
    expert_params = 2 * (4 * (2 * d * 256 + 256 + d) + 8 * (2 * d * 64 + 64 + d))
    router_params = 2 * (12 * d + 2 * d + 2)  # slot queries, slot norm, two log-temperatures
    assert counts['experts'] == expert_params and counts['router'] == router_params
    assert counts['total'] == sum(p.numel() for p in model.parameters())
    assert counts['dense'] == counts['total'] - expert_params - router_params
