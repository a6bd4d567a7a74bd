"""Segmentation fine-tuning of vision encoders with parameter-efficient adapters."""
