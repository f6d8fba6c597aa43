{
  "targets": [
    {
      "target_name": "lifeline_native",
      "sources": ["src/native/lifeline_native.c", "src/native/lz4_block.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
