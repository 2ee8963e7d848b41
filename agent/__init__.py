"""On-device side: the agent daemon (untrusted host), the simulated platform (root of trust) and
the enclave runtime. Built by the issue "Simulated application-level enclave" onwards."""
