"""The runner: what executes an artifact, on the host, under an emulator or on a device.

This package is self-contained on purpose: it imports only the standard library, NumPy and the
artifact's runtime (onnxruntime, tvm's runtime, executorch), never ``slm_export`` or torch (except
the ExecuTorch runtime, whose Python bindings load torch themselves). The host uses it in process;
for an emulator or a device the folder is copied beside the artifact and run as
``python -m slm_runner JOB.json``, so the far side needs neither the tool nor a tokenizer: the host
ships token arrays and reads JSON back (``__main__.py``).
"""
