"""The process around the modes: XLA:CPU flags set before JAX starts (`xla_flags`), JAX's
persistent compilation cache (`compilation_cache`), multi-host setup (`distributed`) and what the
command lines share (`command_line`)."""
