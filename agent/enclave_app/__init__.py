"""The enclave runtime: the code that runs inside the measured enclave process.

Everything in this package, and the Strongroom modules it imports, is packaged into the enclave
image by `strongroom enclave source` + `strongroom enclave build`, so it is covered by MRENCLAVE.
It imports only the standard library, cryptography, pyhpke, pynacl, cbor2 and (for models) the
optional ONNX Runtime: those, and the interpreter, are the unmeasured part of the enclave's trusted
computing base (see docs/threat-model.md).
"""
