"""Triton kernels of certkv, installed as ``certkv.kernels`` (never as a top-level ``kernels``).

Empty until the kernels issue lands: on every device certkv currently serves through the vectorised
torch path in ``certkv.attention``, which the kernels will be tested against field by field.
"""
