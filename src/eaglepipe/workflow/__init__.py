"""The pipeline's wiring: each stage declared once, its code dependencies computed, dvc.yaml generated."""
