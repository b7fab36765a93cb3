from .moejet import *
