"""Triton kernels and their launchers, one kernel family per module.

Installed as ``sdtm_kernels.csrc_triton``. Imported lazily by the ops, never by
``import sdtm_kernels``, so the package works where triton is absent.
"""
