"""Models in and out: loading (with external and lazily read weights), saving atomically,
and the protobuf wire format needed to stream weights file to file."""
