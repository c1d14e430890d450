/*
 * bcryptprimitives.dll stand-in for Wine releases that lack it (Wine < 9).
 *
 * Rust's standard library for Windows (1.78 and later) draws its randomness from
 * ProcessPrng in bcryptprimitives.dll. Wine 8 ships no such DLL, so every Rust program
 * fails to load there. This DLL exports ProcessPrng and forwards it to BCryptGenRandom,
 * which Wine implements. It is used only to run echod's Windows build under Wine in CI.
 */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG)))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
