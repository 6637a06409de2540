"""The compute node: runs each instance as a pod (the tool and its helpers) through a runtime."""
