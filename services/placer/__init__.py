"""The placer service: allocation -> topology-aware, fragmentation-minimising placement."""
