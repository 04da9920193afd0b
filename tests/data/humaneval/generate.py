#!/usr/bin/env python3
"""Writes loom's own HumanEval-X-format problem set and its samples.

Six small problems in each of Python, C++, Java, JavaScript and Go, laid out exactly like the
HumanEval-X files (task_id, prompt, declaration, canonical_solution, test, example_test; Go also
import, test_setup). samples.jsonl holds, per problem, the correct solution and at least two
wrong ones, each with the outcome loom must report in an extra field "expected" (the harness
ignores unknown fields). Run from this directory: python3 generate.py
"""
import json

PY_TEST_HEAD = "\n\nMETADATA = {}\n\n\ndef check(candidate):\n"


def py(task, name, sig, doc, canonical, asserts, samples):
    prompt = f"\n\ndef {name}{sig}:\n    \"\"\" {doc}\n    \"\"\"\n"
    test = PY_TEST_HEAD + "".join(f"    assert {a}\n" for a in asserts) + f"\n\ncheck({name})\n"
    return dict(task_id=f"Python/{task}", prompt=prompt, declaration=f"def {name}{sig}:\n",
                canonical_solution=canonical, test=test, example_test="", text=doc), samples


def cpp(task, decl, doc, canonical, asserts, samples, includes="#include<stdio.h>\n#include<vector>\n#include<string>\nusing namespace std;\n"):
    prompt = f"/*\n{doc}\n*/\n{includes}{decl}{{\n"
    test = "#undef NDEBUG\n#include<assert.h>\nint main(){\n" + "".join(
        f"    assert ({a});\n" for a in asserts) + "}\n"
    return dict(task_id=f"CPP/{task}", prompt=prompt, declaration=f"{includes}{decl}{{\n",
                canonical_solution=canonical, test=test, example_test=""), samples


def java(task, decl, doc, canonical, checks, samples):
    prompt = ("import java.util.*;\nimport java.lang.*;\n\nclass Solution {\n    /**\n    "
              + doc + "\n     */\n    " + decl + " {\n")
    test = ("public class Main {\n    public static void main(String[] args) {\n"
            "        Solution s = new Solution();\n        List<Boolean> correct = Arrays.asList(\n"
            + ",\n".join(f"                {c}" for c in checks)
            + "\n        );\n        if (correct.contains(false)) {\n"
            "            throw new AssertionError();\n        }\n    }\n}\n")
    return dict(task_id=f"Java/{task}", prompt=prompt,
                declaration="import java.util.*;\nimport java.lang.*;\n\nclass Solution {\n    " + decl + " {\n",
                canonical_solution=canonical, test=test, example_test="", text=doc), samples


def js(task, name, params, doc, canonical, asserts, samples):
    prompt = f"/* {doc}\n  */\nconst {name} = ({params}) => {{\n"
    fn = "test" + name[0].upper() + name[1:]
    test = f"const {fn} = () => {{\n" + "".join(
        f"  console.assert({a})\n" for a in asserts) + f"}}\n\n{fn}()\n"
    return dict(task_id=f"JavaScript/{task}", prompt=prompt,
                declaration=f"\nconst {name} = ({params}) => {{\n",
                canonical_solution=canonical, test=test, example_test=""), samples


GO_SETUP = "package main\n\nimport (\n    \"testing\"\n    \"github.com/stretchr/testify/assert\"\n)\n"


def go(task, decl, doc, canonical, asserts, samples, imports=()):
    imp = ""
    if imports:
        imp = "import (\n" + "".join(f"    \"{i}\"\n" for i in imports) + ")\n"
    comment = "".join(f"// {line}\n" for line in doc.split("\n"))
    prompt = (imp + "\n" if imp else "") + comment + decl + " {\n"
    name = decl.split()[1].split("(")[0]
    test = (f"func Test{name}(t *testing.T) {{\n    assert := assert.New(t)\n"
            + "".join(f"    assert.Equal({a})\n" for a in asserts) + "}\n")
    return dict(task_id=f"Go/{task}", prompt=prompt, declaration="\n" + decl + " {\n",
                canonical_solution=canonical, test=test, example_test="", test_setup=GO_SETUP,
                docstring=doc, **{"import": imp}), samples


W, T, C, R, P = "failed", "timeout", "compile_error", "runtime_error", "passed"

problems = {
    "python": [
        py(0, "add", "(a: int, b: int) -> int", "Return the sum of a and b.\n    >>> add(2, 3)\n    5",
           "    return a + b\n", ["candidate(2, 3) == 5", "candidate(-1, 1) == 0"],
           [("    return a - b\n", W), ("    return a +\n", C),
            # Cut at the first unindented line: the junk after the body never runs.
            ("    return a + b\nprint('junk')\nwhile True:\n    pass\n", P)]),
        py(1, "is_palindrome", "(s: str) -> bool", "Is s the same backwards?",
           "    return s == s[::-1]\n", ["candidate('aba') is True", "candidate('ab') is False"],
           [("    return True\n", W), ("    while True:\n        pass\n", T)]),
        py(2, "fib", "(n: int) -> int", "The n-th Fibonacci number, fib(0) = 0.",
           "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
           ["candidate(0) == 0", "candidate(10) == 55", "candidate(1) == 1"],
           [("    a, b = 0, 1\n    for _ in range(n + 1):\n        a, b = b, a + b\n    return a\n", W),
            ("    return fib(n - 1) +* fib(n - 2)\n", C)]),
        py(3, "count_vowels", "(s: str) -> int", "Number of vowels (aeiou) in s.",
           "    return sum(1 for ch in s if ch in 'aeiou')\n",
           ["candidate('hello') == 2", "candidate('xyz') == 0"],
           [("    return s.count('a')\n", W), ("    return len(s) // 0\n", R)]),
        py(4, "max_of", "(l: list) -> int", "Largest element of a non-empty list.",
           "    return max(l)\n", ["candidate([1, 3, 2]) == 3", "candidate([-5]) == -5"],
           [("    return l[0]\n", W), ("    return max(l\n", C)]),
        # The canonical solution uses numpy through the official import helper.
        py(5, "sum_of_squares", "(l: list) -> int", "Sum of the squares of l.",
           "    return int(np.sum(np.array(l, dtype=np.int64) ** 2))\n",
           ["candidate([1, 2, 3]) == 14", "candidate([]) == 0"],
           [("    return sum(l) ** 2\n", W), ("    return undefined_name\n", R)]),
    ],
    "cpp": [
        cpp(0, "int add(int a,int b)", "Return the sum of a and b.\n>>> add(2, 3)\n5",
            "    return a+b;\n}\n", ["add(2,3)==5", "add(-1,1)==0"],
            [("    return a-b;\n}\n", W), ("    return a+b\n}\n", C)]),
        cpp(1, "bool is_palindrome(string s)", "Is s the same backwards?",
            "    return string(s.rbegin(),s.rend())==s;\n}\n",
            ["is_palindrome(\"aba\")==true", "is_palindrome(\"ab\")==false"],
            [("    return true;\n}\n", W),
             ("    volatile long x=0;\n    while(true){x++;}\n    return true;\n}\n", T)]),
        cpp(2, "long long fib(int n)", "The n-th Fibonacci number, fib(0) = 0.",
            "    long long a=0,b=1;\n    for(int i=0;i<n;i++){long long t=a+b;a=b;b=t;}\n    return a;\n}\n",
            ["fib(0)==0", "fib(10)==55", "fib(1)==1"],
            [("    long long a=0,b=1;\n    for(int i=0;i<=n;i++){long long t=a+b;a=b;b=t;}\n    return a;\n}\n", W),
             ("    return undefined_fn(n);\n}\n", C)]),
        cpp(3, "int count_vowels(string s)", "Number of vowels (aeiou) in s.",
            "    int n=0;\n    for(char c:s) if(string(\"aeiou\").find(c)!=string::npos) n++;\n    return n;\n}\n",
            ["count_vowels(\"hello\")==2", "count_vowels(\"xyz\")==0"],
            [("    return count(s.begin(),s.end(),'a');\n}\n", W),
             ("    vector<int> v;\n    return v.at(5);\n}\n", R)]),
        cpp(4, "float max_of(vector<float> l)", "Largest element of a non-empty vector.",
            "    return *max_element(l.begin(),l.end());\n}\n",
            ["abs(max_of({1,3,2})-3)<1e-4", "abs(max_of({-5})+5)<1e-4"],
            [("    return l[0];\n}\n", W), ("    return l.maximum();\n}\n", C)]),
        cpp(5, "int sum_of_squares(vector<int> l)", "Sum of the squares of l.",
            "    int s=0;\n    for(int x:l) s+=x*x;\n    return s;\n}\n",
            ["sum_of_squares({1,2,3})==14", "sum_of_squares({})==0"],
            [("    int s=0;\n    for(int x:l) s+=x;\n    return s*s;\n}\n", W),
             ("    throw runtime_error(\"boom\");\n}\n", R)]),
    ],
    "java": [
        java(0, "public int add(int a, int b)", "Return the sum of a and b.",
             "        return a + b;\n    }\n}", ["s.add(2, 3) == 5", "s.add(-1, 1) == 0"],
             [("        return a - b;\n    }\n}", W), ("        return a + b\n    }\n}", C)]),
        java(1, "public boolean isPalindrome(String s)", "Is s the same backwards?",
             "        return new StringBuilder(s).reverse().toString().equals(s);\n    }\n}",
             ["s.isPalindrome(\"aba\")", "!s.isPalindrome(\"ab\")"],
             [("        return true;\n    }\n}", W), ("        while (true) {}\n    }\n}", T)]),
        java(2, "public long fib(int n)", "The n-th Fibonacci number, fib(0) = 0.",
             "        long a = 0, b = 1;\n        for (int i = 0; i < n; i++) { long t = a + b; a = b; b = t; }\n        return a;\n    }\n}",
             ["s.fib(0) == 0", "s.fib(10) == 55", "s.fib(1) == 1"],
             [("        long a = 0, b = 1;\n        for (int i = 0; i <= n; i++) { long t = a + b; a = b; b = t; }\n        return a;\n    }\n}", W),
              ("        return undefinedFn(n);\n    }\n}", C)]),
        java(3, "public int countVowels(String s)", "Number of vowels (aeiou) in s.",
             "        int n = 0;\n        for (char c : s.toCharArray()) if (\"aeiou\".indexOf(c) >= 0) n++;\n        return n;\n    }\n}",
             ["s.countVowels(\"hello\") == 2", "s.countVowels(\"xyz\") == 0"],
             [("        return s.length();\n    }\n}", W),
              ("        int[] x = new int[1];\n        return x[5];\n    }\n}", R)]),
        java(4, "public int maxOf(List<Integer> l)", "Largest element of a non-empty list.",
             "        return Collections.max(l);\n    }\n}",
             ["s.maxOf(Arrays.asList(1, 3, 2)) == 3", "s.maxOf(Arrays.asList(-5)) == -5"],
             [("        return l.get(0);\n    }\n}", W), ("        return l.maximum();\n    }\n}", C)]),
        java(5, "public int sumOfSquares(List<Integer> l)", "Sum of the squares of l.",
             "        return l.stream().mapToInt(x -> x * x).sum();\n    }\n}",
             ["s.sumOfSquares(Arrays.asList(1, 2, 3)) == 14", "s.sumOfSquares(new ArrayList<>()) == 0"],
             [("        int t = l.stream().mapToInt(x -> x).sum();\n        return t * t;\n    }\n}", W),
              ("        throw new IllegalStateException(\"boom\");\n    }\n}", R)]),
    ],
    "js": [
        js(0, "add", "a, b", "Return the sum of a and b.\n  >>> add(2, 3)\n  5",
           "  return a + b;\n}\n", ["add(2, 3) === 5", "add(-1, 1) === 0"],
           [("  return a - b;\n}\n", W), ("  return a + ;\n}\n", C),
            # Any output fails a JavaScript sample, even with a right answer.
            ("  console.log('debug');\n  return a + b;\n}\n", W)]),
        js(1, "isPalindrome", "s", "Is s the same backwards?",
           "  return s.split('').reverse().join('') === s;\n}\n",
           ["isPalindrome('aba') === true", "isPalindrome('ab') === false"],
           [("  return true;\n}\n", W), ("  while (true) {}\n}\n", T)]),
        js(2, "fib", "n", "The n-th Fibonacci number, fib(0) = 0.",
           "  let a = 0, b = 1;\n  for (let i = 0; i < n; i++) { [a, b] = [b, a + b]; }\n  return a;\n}\n",
           ["fib(0) === 0", "fib(10) === 55", "fib(1) === 1"],
           [("  let a = 0, b = 1;\n  for (let i = 0; i <= n; i++) { [a, b] = [b, a + b]; }\n  return a;\n}\n", W),
            ("  return fib(n - 1) +* ;\n}\n", C)]),
        js(3, "countVowels", "s", "Number of vowels (aeiou) in s.",
           "  return s.split('').filter((c) => 'aeiou'.includes(c)).length;\n}\n",
           ["countVowels('hello') === 2", "countVowels('xyz') === 0"],
           [("  return s.length;\n}\n", W), ("  return undefinedFn(s);\n}\n", R)]),
        js(4, "maxOf", "l", "Largest element of a non-empty array.",
           "  return Math.max(...l);\n}\n", ["maxOf([1, 3, 2]) === 3", "maxOf([-5]) === -5"],
           [("  return l[0];\n}\n", W), ("  return Math.max(...l\n}\n", C)]),
        js(5, "sumOfSquares", "l", "Sum of the squares of l.",
           "  return l.reduce((s, x) => s + x * x, 0);\n}\n",
           ["sumOfSquares([1, 2, 3]) === 14", "sumOfSquares([]) === 0"],
           [("  const t = l.reduce((s, x) => s + x, 0);\n  return t * t;\n}\n", W),
            ("  throw new Error('boom');\n}\n", R)]),
    ],
    "go": [
        go(0, "func Add(a int, b int) int", "Return the sum of a and b.\n>>> Add(2, 3)\n5",
           "    return a + b\n}\n", ["5, Add(2, 3)", "0, Add(-1, 1)"],
           [("    return a - b\n}\n", W), ("    x := 1\n    return a + b\n}\n", C)]),
        # The prompt imports strings; the harness strips it and re-adds it because the code uses it.
        go(1, "func IsPalindrome(s string) bool", "Is s the same backwards?",
           "    r := []rune(s)\n    for i, j := 0, len(r)-1; i < j; i, j = i+1, j-1 {\n        r[i], r[j] = r[j], r[i]\n    }\n    return strings.Compare(string(r), s) == 0\n}\n",
           ["true, IsPalindrome(\"aba\")", "false, IsPalindrome(\"ab\")"],
           [("    return true\n}\n", W), ("    for {\n    }\n}\n", T)], imports=("strings",)),
        go(2, "func Fib(n int) int", "The n-th Fibonacci number, Fib(0) = 0.",
           "    a, b := 0, 1\n    for i := 0; i < n; i++ {\n        a, b = b, a+b\n    }\n    return a\n}\n",
           ["0, Fib(0)", "55, Fib(10)", "1, Fib(1)"],
           [("    a, b := 0, 1\n    for i := 0; i <= n; i++ {\n        a, b = b, a+b\n    }\n    return a\n}\n", W),
            ("    return undefinedFn(n)\n}\n", C)]),
        go(3, "func CountVowels(s string) int", "Number of vowels (aeiou) in s.",
           "    n := 0\n    for _, c := range s {\n        if strings.ContainsRune(\"aeiou\", c) {\n            n++\n        }\n    }\n    return n\n}\n",
           ["2, CountVowels(\"hello\")", "0, CountVowels(\"xyz\")"],
           [("    return len(s)\n}\n", W), ("    var m []int\n    return m[3]\n}\n", R)],
           imports=("strings",)),
        go(4, "func MaxOf(l []int) int", "Largest element of a non-empty slice.",
           "    sort.Ints(l)\n    return l[len(l)-1]\n}\n",
           ["3, MaxOf([]int{1, 3, 2})", "-5, MaxOf([]int{-5})"],
           [("    return l[0]\n}\n", W), ("    return l.Max()\n}\n", C)], imports=("sort",)),
        go(5, "func SumOfSquares(l []int) int", "Sum of the squares of l.",
           "    s := 0\n    for _, x := range l {\n        s += x * x\n    }\n    return s\n}\n",
           ["14, SumOfSquares([]int{1, 2, 3})", "0, SumOfSquares([]int{})"],
           [("    s := 0\n    for _, x := range l {\n        s += x\n    }\n    return s * s\n}\n", W),
            ("    panic(\"boom\")\n}\n", R)]),
    ],
}

samples = []
for lang, entries in problems.items():
    with open(f"humaneval_{lang}.jsonl", "w") as f:
        for record, wrong in entries:
            f.write(json.dumps(record) + "\n")
            samples.append(dict(task_id=record["task_id"], generation=record["canonical_solution"],
                                expected=P))
            for gen, expected in wrong:
                samples.append(dict(task_id=record["task_id"], generation=gen, expected=expected))
with open("samples.jsonl", "w") as f:
    for s in samples:
        f.write(json.dumps(s) + "\n")
print(f"{sum(len(v) for v in problems.values())} problems, {len(samples)} samples")
