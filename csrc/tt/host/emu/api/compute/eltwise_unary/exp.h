#pragma once
#include "api/compute/emu_compute.h"
