// specdec_client: calls specdec.v1.SpecDecode/Generate and /GenerateStream from C++.
//
//   specdec_client --address 127.0.0.1:50051 --prompt "def fib(n):" --max-new-tokens 16
//   options: --temperature T --seed S  --tls-ca CA.pem [--tls-cert C.pem --tls-key K.pem] [--server-name NAME]
//   the bearer token, if the server wants one, comes from $SPECDEC_AUTH_TOKEN (never from the command line)
//
// Output (one item per line, for people and for tests/test_cpp_client.py):
//   generate.token_ids: 1 2 3 ...      generate.finish: FINISH_REASON_LENGTH   generate.completion_tokens: N
//   stream.chunks: K                   stream.token_ids: 1 2 3 ...             stream.completion_tokens: N
//   generate.text / stream.text follow, each on its own line, with \n and \\ escaped.
// Exit status: 0 on success, 1 on an RPC error (the status code name and message go to stderr), 2 on usage.

#include <grpcpp/grpcpp.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>

#include "specdec/v1/specdec.grpc.pb.h"

namespace {

const char* kCodeNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                            "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                            "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                            "UNAUTHENTICATED"};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\n') out += "\\n";
    else if (c == '\\') out += "\\\\";
    else out += c;
  }
  return out;
}

template <typename Ids>
std::string Join(const Ids& ids) {
  std::string out;
  for (int i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids.Get(i));
  return out;
}

int Fail(const grpc::Status& s, const char* what) {
  int code = static_cast<int>(s.error_code());
  std::cerr << what << " failed: " << (code >= 0 && code <= 16 ? kCodeNames[code] : "?") << ": " << s.error_message()
            << "\n";
  return 1;
}

void AddAuth(grpc::ClientContext& ctx) {
  if (const char* token = std::getenv("SPECDEC_AUTH_TOKEN"); token && *token)
    ctx.AddMetadata("authorization", std::string("Bearer ") + token);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> opt = {{"--address", "127.0.0.1:50051"}, {"--prompt", "def fib(n):"},
                                            {"--max-new-tokens", "16"}};
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "--help" || key == "-h" || i + 1 >= argc || key.rfind("--", 0) != 0) {
      std::cerr << "usage: specdec_client [--address HOST:PORT] [--prompt TEXT] [--max-new-tokens N] [--temperature T]"
                   " [--seed S] [--tls-ca CA] [--tls-cert CERT --tls-key KEY] [--server-name NAME]\n";
      return 2;
    }
    opt[key] = argv[++i];
  }

  std::shared_ptr<grpc::ChannelCredentials> creds;
  grpc::ChannelArguments args;
  try {
    if (opt.count("--tls-ca") || opt.count("--tls-cert")) {
      grpc::SslCredentialsOptions ssl;
      if (opt.count("--tls-ca")) ssl.pem_root_certs = ReadFile(opt["--tls-ca"]);
      if (opt.count("--tls-cert")) {
        ssl.pem_cert_chain = ReadFile(opt["--tls-cert"]);
        ssl.pem_private_key = ReadFile(opt.at("--tls-key"));
      }
      creds = grpc::SslCredentials(ssl);
      if (opt.count("--server-name")) args.SetSslTargetNameOverride(opt["--server-name"]);
    } else {
      creds = grpc::InsecureChannelCredentials();
    }
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  auto channel = grpc::CreateCustomChannel(opt["--address"], creds, args);
  auto stub = specdec::v1::SpecDecode::NewStub(channel);

  specdec::v1::GenerateRequest request;
  request.set_text(opt["--prompt"]);
  request.set_max_new_tokens(std::stoi(opt["--max-new-tokens"]));
  if (opt.count("--temperature")) request.mutable_sampling()->set_temperature(std::stod(opt["--temperature"]));
  if (opt.count("--seed")) request.mutable_sampling()->set_seed(std::stoull(opt["--seed"]));

  // Unary
  specdec::v1::GenerateResponse response;
  {
    grpc::ClientContext ctx;
    AddAuth(ctx);
    grpc::Status status = stub->Generate(&ctx, request, &response);
    if (!status.ok()) return Fail(status, "Generate");
  }
  const auto& sum = response.summary();
  std::cout << "generate.request_id: " << response.request_id() << "\n"
            << "generate.token_ids: " << Join(response.token_ids()) << "\n"
            << "generate.finish: " << specdec::v1::FinishReason_Name(sum.finish_reason()) << "\n"
            << "generate.completion_tokens: " << sum.usage().completion_tokens() << "\n"
            << "generate.acceptance_rate: " << sum.speculation().acceptance_rate() << "\n"
            << "generate.text: " << Escape(response.text()) << "\n";

  // Server streaming: one chunk per verify step, then the summary
  grpc::ClientContext ctx;
  AddAuth(ctx);
  auto reader = stub->GenerateStream(&ctx, request);
  specdec::v1::GenerateStreamResponse message;
  std::string text, ids;
  int chunks = 0;
  unsigned completion = 0;
  while (reader->Read(&message)) {
    if (message.has_chunk()) {
      ++chunks;
      text += message.chunk().text();
      std::string part = Join(message.chunk().token_ids());
      if (!part.empty()) ids += (ids.empty() ? "" : " ") + part;
    } else if (message.has_summary()) {
      completion = message.summary().usage().completion_tokens();
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return Fail(status, "GenerateStream");
  std::cout << "stream.chunks: " << chunks << "\n"
            << "stream.token_ids: " << ids << "\n"
            << "stream.completion_tokens: " << completion << "\n"
            << "stream.text: " << Escape(text) << "\n";
  return 0;
}
