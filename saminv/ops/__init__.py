"""Fused operations with plain-ops fallbacks (NVIDIA stylegan2-ada style: torch_utils/ops)."""
