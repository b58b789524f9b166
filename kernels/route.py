"""Triton kernels of the fused router op."""
if __name__ != "moe_fastmask.kernels.route":
    raise ImportError("moe_fastmask's Triton kernels are importable only as 'moe_fastmask.kernels.route'")
X = 1
