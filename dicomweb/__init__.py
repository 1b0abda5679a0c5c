"""The DICOMweb protocol (PS3.18); knows nothing of Parquet, Zarr or imgindex's schema."""
