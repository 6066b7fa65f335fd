// A CPU-bound Java program: phases of integer work, one line each.
public class Spin {
    public static void main(String[] args) {
        long total = 0;
        for (int phase = 0; phase < 12; phase++) {
            long x = phase + 1, s = 0;
            for (int i = 0; i < 40_000_000; i++) {
                x ^= x << 13;
                x ^= x >>> 7;
                x ^= x << 17;
                s += x & 0xff;
            }
            total += s;
            System.out.println("phase " + phase + " " + s);
        }
        System.out.println("total " + total);
        System.exit(6);
    }
}
