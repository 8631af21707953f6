#include <exception>
// Debian 12 libstdc++ (GCC 12) lacks this GCC 13 ABI helper, called when an exception leaves a noexcept function.
extern "C" void __cxa_call_terminate(void*) noexcept { std::terminate(); }
