"""The real OHIF viewer in the tests: its package from npm, a same-origin server with a proxy to
Orthanc's DICOMweb, headless Chromium, and the geometry that maps a viewport back to source pixels."""
