"""Triton kernels of moe_fastmask (pure compute, no model code), shipped as ``moe_fastmask.kernels``."""

if __name__ != "moe_fastmask.kernels":
    # The source tree's root is on sys.path (``python -c`` or ``python -m`` run from it), so this folder was found
    # as a top-level ``kernels``: that name is Hugging Face's ``kernels`` package, which transformers probes while it
    # imports. Raising here would break ``import transformers``; instead present the inert shape transformers
    # already treats as "not installed" (a module without ``__file__``) and export nothing. Each kernel module
    # refuses to load under this name.
    __file__ = None  # noqa: F811
    __all__: list[str] = []
