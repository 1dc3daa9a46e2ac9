"""End-to-end tests: real engines and processes (Ray, the Deployment Engine, SIGKILL and resume, process cleanup)."""
