"""Peer tests: real DICOM servers (Orthanc) started on loopback."""
