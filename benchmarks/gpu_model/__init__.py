""" The GPU cost model: an eager step recorded on fake CUDA tensors, charged against an H200 or H100. """
