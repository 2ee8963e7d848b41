"""The enclave loader: the first and only code of the enclave process not taken from the image.

Started for the platform (by the platform itself, or by the privileged launcher as the enclave's
user) as `python -I -B -m agent.bootstrap PLATFORM_FD HOST_FD` with a scrubbed environment and no
other descriptors. It hardens the process, receives the measured image content
from the platform, makes the image's modules importable from memory (taking precedence over any
installed copy of the same packages, whose modules it drops), and runs the image's `__main__.py`.
This plays the part of the hardware's enclave loader (SGX's ECREATE/EADD/EINIT).
"""

# Imports sit inside main() on purpose: the process is hardened before anything else loads.
# ruff: noqa: PLC0415
from __future__ import annotations

import sys


def main() -> None:
    from agent.hardening import harden_process

    hardening = harden_process()
    from agent.channel import Channel, check
    from agent.memimport import MemoryFinder
    from strongroom.image import MAX_CONTENT_SIZE, parse_content

    platform_fd, host_fd = int(sys.argv[1]), int(sys.argv[2])
    platform = Channel.from_fd(platform_fd)
    header = check(platform.recv(timeout=30), {"size": int})
    if not 0 < header["size"] <= MAX_CONTENT_SIZE:
        raise SystemExit(2)
    content = bytearray()
    while len(content) < header["size"]:
        content += check(platform.recv(timeout=30), {"data": bytes})["data"]
    files = parse_content(bytes(content))
    if "__main__.py" not in files:
        raise SystemExit(2)
    # From here on, every module of the image's own packages comes from the measured image.
    for name in list(sys.modules):
        top = name.partition(".")[0]
        if f"{top}/__init__.py" in files or f"{top}.py" in files:
            del sys.modules[name]
    MemoryFinder(files, "enclave").install()
    sys.argv = [
        "enclave",
        str(platform.detach()),
        str(host_fd),
        ",".join(k for k, v in hardening.items() if v),
    ]
    code = compile(files["__main__.py"], "<sealed:enclave>/__main__.py", "exec", dont_inherit=True)
    exec(code, {"__name__": "__main__"})  # noqa: S102 - running the verified, measured image


if __name__ == "__main__":
    main()
