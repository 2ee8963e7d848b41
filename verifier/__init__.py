"""Fleet side: evidence appraisal, key broker, attestation results, revocation and dashboard.
Built by the issue "Remote attestation over MQTT" onwards."""
