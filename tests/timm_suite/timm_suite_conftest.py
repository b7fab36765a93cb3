"""conftest.py for timm's own ``tests/test_models.py`` run against timm-moejet's models.

Copied next to the ``test_models.py`` taken from the timm sdist (never committed). It imports the plugin and
wraps ``timm.list_models``/``list_pretrained`` (bound by ``test_models.py`` at import) so that our models are
treated like their timm families: the MoE ViTs like timm's ViTs (listed wherever ``vit_*`` is: NON_STD, token
features; excluded wherever ``vit_*`` is; in the ``vision_transformer`` module group for forward_intermediates and
pruning), the MoE ConvNeXts like timm's ConvNeXts (CNN features; in the ``convnext`` module group), the MoE
MLP-Mixers like timm's Mixers (``*mixer_*``; the ``mlp_mixer`` module group). Only our models are returned, so the
run covers nothing else.
"""
import fnmatch
import importlib
import os

import timm

PLUGIN = os.environ.get('PLUGIN_PKG', 'timm_moejet')
# (our name patterns, the timm filter they stand beside, the timm module group they join, our module)
FAMILIES = (
    (['moejet_vit*', 'softmoe_*'], 'vit_*', 'vision_transformer', 'moejet_vit'),
    (['moejet_convnext*'], 'convnext*', 'convnext', 'moejet_convnext'),
    (['moejet_mixer*'], '*mixer_*', 'mlp_mixer', 'moejet_mixer'),
)
PATTERNS = [p for patterns, *_ in FAMILIES for p in patterns]

importlib.import_module(PLUGIN)
_list_models = timm.list_models
_list_pretrained = timm.list_pretrained


def _as_list(value):
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _ours(names):
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in PATTERNS)]


def list_models(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False,
                include_tags=None):
    filters, excludes, modules = _as_list(filter), _as_list(exclude_filters), _as_list(module)
    for patterns, timm_filter, timm_module, ours in FAMILIES:
        if timm_filter in filters:
            filters = filters + patterns
        if timm_filter in excludes:
            excludes = excludes + patterns
        if timm_module in modules:
            modules = modules + [ours]
    names = _list_models(
        filter=filters or '', module=modules or '', pretrained=pretrained, exclude_filters=excludes or '',
        name_matches_cfg=name_matches_cfg, include_tags=include_tags)
    return _ours(names)


def list_pretrained(filter='', exclude_filters=''):
    return _ours(_list_pretrained(filter=filter, exclude_filters=exclude_filters))


timm.list_models = list_models
timm.list_pretrained = list_pretrained
