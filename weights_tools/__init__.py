"""weights_tools: the timm-moejet command line (``python -m weights_tools --help``)."""
