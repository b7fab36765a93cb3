"""weights_tools: the timm-moejet command line, installed as ``weights-tools`` (also ``python -m weights_tools``)."""
