"""Wire formats shared by devices and servers: pure functions, no I/O."""
