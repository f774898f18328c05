#pragma once
#define GGML_VERSION "0.0.0"
#define GGML_COMMIT "0c1e570"
