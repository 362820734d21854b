"""Ray clusters: submitting job specs with the Ray Jobs SDK, the rules a run must satisfy on a
multi-node cluster, and a local head for trying both on one machine."""
