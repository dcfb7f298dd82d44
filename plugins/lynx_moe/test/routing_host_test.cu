// routing_host_test.cu: the popularity table's lookup (LYNX_KERNEL_POPULARITY_TABLE) on the host.
//
// lynx_popularity_table replaces B ** bin by a table of the same correctly rounded values for the
// bins 0, -1, ..., -(kPowTable - 1) and calls pow for every other bin. This checks, bit for bit,
// that table_weight equals pow_rounded for integer bins inside and past the table, -0, +-inf and
// NaN, at batch sizes 1..1024: so the variant's popularity (summed in the same token order) and
// therefore its routing are the default kernel's. Built by tests/test_plugin_core.py with nvcc.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "routing.cuh"

int main() {
    int failures = 0;
    float table[lynx::kPowTable];
    const float specials[] = {-0.0f, 0.0f, -INFINITY, INFINITY, NAN, -0.5f};
    for (int rows = 1; rows <= 1024; ++rows) {
        const float batch = static_cast<float>(rows);
        for (int j = 0; j < lynx::kPowTable; ++j) table[j] = lynx::pow_rounded(batch, -static_cast<float>(j));  // as the kernel fills it
        auto check = [&](float bin) {
            const float got = lynx::table_weight(table, batch, bin), want = lynx::pow_rounded(batch, bin);
            if (std::memcmp(&got, &want, sizeof got) != 0 && !(std::isnan(got) && std::isnan(want))) {
                if (failures++ < 10) std::printf("FAILED batch %d bin %g: table %a, pow %a\n", rows, bin, got, want);
            }
        };
        for (int bin = -300; bin <= 2; ++bin) check(static_cast<float>(bin));
        for (float bin : specials) check(bin);
    }
    std::printf("%s\n", failures ? "routing_host_test: FAILED" : "routing_host_test: ok");
    return failures ? 1 : 0;
}
