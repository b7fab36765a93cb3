from .from_donor import create_moejet_from
from .moejet import *
from .moejet_convnext import *
