"""imgindex: index PACS/DICOM metadata, join it with OMOP EMR data, export cohorts."""
