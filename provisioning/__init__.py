"""Fleet-side provisioning: the fleet home and its root of trust, device enrollment, signed
enclave images, encrypted artifacts and their keystore, and (later) broker configuration."""
