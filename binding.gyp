{
  "targets": [
    {
      "target_name": "lifeline_native",
      "sources": ["src/native/lifeline_native.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
