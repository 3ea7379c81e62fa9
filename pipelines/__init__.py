"""Training data: one TFRecord format (schema.py), atomic sharded writing (writer.py), the sharded
streaming reader (reader.py) and its thread count (threads.py), converters from image folders
(folders.py) and InsightFace RecordIO (mxrec.py), synthetic identities (synth.py), verification
.bin files (verification.py), a full check (check.py), and paths on object storage (storage.py).
See docs/data.md.

Imports neither launch nor monitoring.
"""
